//! `copy_missing_parents` against real PostgreSQL: only the same entity is copied (uuid keys, or
//! keys the operator lists), the closure follows the whole foreign-key graph, identity and
//! generated columns, one broken key never blocks the others.

use tenant_audit::report::{CopyVerdict, Detail};

use crate::support::{cli, config, config_file, fixture_db, lines, pg, scan};

const COPY: &str = "[tenants]\ninclude = ['^tenant_']\n[heal]\ncopy_missing_parents = true\n";

async fn rows(url: &str, sql: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

fn heal(url: &str, name: &str, extra: &str) -> std::process::Output {
    let path = config_file(name, &format!("database_url = {url:?}\n{COPY}{extra}"));
    cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[])
}

/// `table` in the shared schema and in `tenant_a` (same definition, `{s}` the schema).
fn both(definition: &str) -> String {
    ["public", "tenant_a"].iter().map(|s| definition.replace("{s}", s) + ";\n").collect()
}

/// The post-mortem's trap with integer keys: the tenant's product points at its deleted
/// category 17, and `public.category` 17 is an unrelated category.
const INTEGER_KEYS: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE TABLE public.category (id serial PRIMARY KEY, name text NOT NULL);
    CREATE TABLE tenant_a.category (id serial PRIMARY KEY, name text NOT NULL);
    CREATE TABLE tenant_a.product (id serial PRIMARY KEY, category_id int REFERENCES tenant_a.category (id));
    INSERT INTO public.category (id, name) SELECT g, 'shared category ' || g FROM generate_series(1, 20) g;
    SELECT setval('public.category_id_seq', 20);
    INSERT INTO tenant_a.category (name) SELECT 'own category ' || g FROM generate_series(1, 16) g;
    SET session_replication_role = replica;
    INSERT INTO tenant_a.product (category_id) VALUES (17);
    RESET session_replication_role;";

#[tokio::test]
async fn integer_keys_are_never_copied_unless_the_table_is_listed() {
    let url = fixture_db("heal_graph_integer", INTEGER_KEYS).await;
    let report = scan(&config(&url, COPY)).await;
    assert_eq!(
        lines(&report.findings),
        ["orphan_rows tenant_a.product(category_id) 1 -> tenant_a.category Shared Constraint [\"17\"]"]
    );
    let Detail::OrphanRows { heal_copy, .. } = &report.findings[0].detail else { panic!() };
    assert_eq!(*heal_copy, CopyVerdict::NotSameEntity);
    assert!(report.to_table().contains("not copied by heal: the key is not globally unique (not a uuid)"));
    assert!(report.to_json().contains("\"heal_copy\": \"not_same_entity\""));

    let out = heal(&url, "heal_graph_integer", "");
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains(": 0 change(s), 0 tenant(s) skipped, 0 error(s)"));
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.category WHERE id = 17").await, ["0"]);

    // Listed by the operator as the same entity everywhere: copied, and the sequence moves.
    let listed = "same_entity_keys = [{ table = 'category', columns = ['id'] }]\n";
    let report = scan(&config(&url, &format!("{COPY}{listed}"))).await;
    let Detail::OrphanRows { heal_copy, .. } = &report.findings[0].detail else { panic!() };
    assert_eq!(*heal_copy, CopyVerdict::Copy);
    let out = heal(&url, "heal_graph_integer_listed", listed);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.category WHERE id = 17").await, ["shared category 17"]);
    assert_eq!(
        rows(&url, "INSERT INTO tenant_a.category (name) VALUES ('next') RETURNING id::text").await,
        ["18"],
        "the application's next default-key insert succeeds"
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s %s', table_name, row_key, coalesce(old_value::text, 'NULL'), new_value) FROM tenant_audit.heal_log ORDER BY id").await,
        [
            "category {\"id\": 17} NULL {\"id\": 17, \"name\": \"shared category 17\"}",
            "category {\"column\": \"id\", \"sequence\": \"category_id_seq\"} {\"next_value\": 17} {\"next_value\": 18}",
        ]
    );
}

#[tokio::test]
async fn identity_always_and_generated_columns_are_copied_as_postgresql_requires() {
    let sql = format!(
        "SELECT pg_temp.create_tenant('tenant_a');
        {}
        CREATE TABLE tenant_a.line (id serial PRIMARY KEY, widget_id bigint REFERENCES tenant_a.widget (id));
        INSERT INTO public.widget (qty) SELECT g FROM generate_series(1, 5) g;
        INSERT INTO tenant_a.widget (qty) VALUES (100);
        SET session_replication_role = replica;
        INSERT INTO tenant_a.line (widget_id) VALUES (4);
        RESET session_replication_role;",
        both("CREATE TABLE {s}.widget (id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, qty int NOT NULL, double_qty int GENERATED ALWAYS AS (qty * 2) STORED)")
    );
    let url = fixture_db("heal_graph_identity", &sql).await;
    // tenant_a's widget 1 is its own; 4 is the shared one (the listed key says: the same entity).
    let out = heal(
        &url,
        "heal_graph_identity",
        "same_entity_keys = [{ table = 'widget', columns = ['id'] }]\naudit_values = 'keys'\n",
    );
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s', id, qty, double_qty) FROM tenant_a.widget ORDER BY id").await,
        ["1 100 200", "4 4 8"]
    );
    assert_eq!(rows(&url, "INSERT INTO tenant_a.widget (qty) VALUES (7) RETURNING id::text").await, ["5"]);
    // audit_values = "keys": the key, never the row.
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s', row_key, coalesce(new_value::text, 'NULL')) FROM tenant_audit.heal_log ORDER BY id"
        )
        .await,
        ["{\"id\": 4} NULL", "{\"column\": \"id\", \"sequence\": \"widget_id_seq\"} {\"next_value\": 5}"]
    );
}

/// Four shapes of graph, all orphaned by one tenant row each: a three-level self-referencing
/// tree, a diamond, a cycle through deferrable keys, and a composite key.
fn graph_sql() -> String {
    let tables = [
        "CREATE TABLE {s}.node (id uuid PRIMARY KEY, parent_id uuid REFERENCES {s}.node (id), name text)",
        "CREATE TABLE {s}.d_top (id uuid PRIMARY KEY)",
        "CREATE TABLE {s}.d_left (id uuid PRIMARY KEY, top_id uuid NOT NULL REFERENCES {s}.d_top (id))",
        "CREATE TABLE {s}.d_right (id uuid PRIMARY KEY, top_id uuid NOT NULL REFERENCES {s}.d_top (id))",
        "CREATE TABLE {s}.d_bottom (id uuid PRIMARY KEY, left_id uuid NOT NULL REFERENCES {s}.d_left (id), right_id uuid NOT NULL REFERENCES {s}.d_right (id))",
        "CREATE TABLE {s}.cyc_a (id uuid PRIMARY KEY, b_id uuid)",
        "CREATE TABLE {s}.cyc_b (id uuid PRIMARY KEY, a_id uuid REFERENCES {s}.cyc_a (id) DEFERRABLE INITIALLY DEFERRED)",
        "ALTER TABLE {s}.cyc_a ADD FOREIGN KEY (b_id) REFERENCES {s}.cyc_b (id) DEFERRABLE INITIALLY DEFERRED",
        "CREATE TABLE {s}.comp (org uuid, line int, note text, PRIMARY KEY (org, line))",
    ];
    let u = |n: u32| format!("'a0000000-0000-0000-0000-{n:012}'");
    format!(
        "SELECT pg_temp.create_tenant('tenant_a');
        {}
        CREATE TABLE tenant_a.refs (id serial PRIMARY KEY,
          node_id uuid REFERENCES tenant_a.node (id), bottom_id uuid REFERENCES tenant_a.d_bottom (id),
          cyc_id uuid REFERENCES tenant_a.cyc_a (id), org uuid, line int,
          FOREIGN KEY (org, line) REFERENCES tenant_a.comp (org, line));
        INSERT INTO public.node VALUES ({a}, NULL, 'root'), ({b}, {a}, 'branch'), ({c}, {b}, 'leaf');
        INSERT INTO public.d_top VALUES ({a});
        INSERT INTO public.d_left VALUES ({b}, {a});
        INSERT INTO public.d_right VALUES ({c}, {a});
        INSERT INTO public.d_bottom VALUES ({d}, {b}, {c});
        BEGIN;
        INSERT INTO public.cyc_a VALUES ({a}, {b});
        INSERT INTO public.cyc_b VALUES ({b}, {a});
        COMMIT;
        INSERT INTO public.comp VALUES ({a}, 1, 'one'), ({a}, 2, 'two');
        SET session_replication_role = replica;
        INSERT INTO tenant_a.refs (node_id, bottom_id, cyc_id, org, line) VALUES ({c}, {d}, {a}, {a}, 2);
        RESET session_replication_role;",
        tables.iter().map(|t| both(t)).collect::<String>(),
        a = u(1),
        b = u(2),
        c = u(3),
        d = u(4),
    )
}

#[tokio::test]
async fn the_closure_follows_trees_diamonds_deferrable_cycles_and_composite_keys() {
    let url = fixture_db("heal_graph_shapes", &graph_sql()).await;
    let listed = "same_entity_keys = [{ table = 'comp', columns = ['org', 'line'] }]\n";
    let cfg = config(&url, &format!("{COPY}{listed}"));
    assert_eq!(scan(&cfg).await.findings.len(), 4);
    let out = heal(&url, "heal_graph_shapes", listed);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("copy_missing_parents: 10 change(s)\n"));
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s', table_name, count(*)) FROM tenant_audit.heal_log GROUP BY table_name ORDER BY 1"
        )
        .await,
        ["comp 1", "cyc_a 1", "cyc_b 1", "d_bottom 1", "d_left 1", "d_right 1", "d_top 1", "node 3"]
    );
    assert_eq!(
        rows(&url, "SELECT name FROM tenant_a.node ORDER BY name").await,
        ["branch", "leaf", "root"],
        "the tree with every ancestor"
    );
    assert_eq!(rows(&url, "SELECT note FROM tenant_a.comp").await, ["two"], "only the key referenced");
    assert_eq!(lines(&scan(&cfg).await.findings), Vec::<String>::new());
}

#[tokio::test]
async fn a_broken_chain_and_a_unique_clash_are_set_aside_and_the_other_keys_heal_in_the_same_run() {
    let u = |n: u32| format!("'c0000000-0000-0000-0000-{n:012}'");
    let sql = format!(
        "SELECT pg_temp.create_tenant('tenant_a');
        {}
        {}
        CREATE TABLE tenant_a.refs (id serial PRIMARY KEY, thing_id uuid REFERENCES tenant_a.thing (id));
        INSERT INTO public.owner SELECT ('d0000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'owner ' || g FROM generate_series(1, 5) g;
        SET session_replication_role = replica;
        INSERT INTO public.thing SELECT ('c0000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid,
          ('d0000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'thing ' || g FROM generate_series(1, 7) g;
        INSERT INTO tenant_a.refs (thing_id) SELECT ('c0000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid FROM generate_series(1, 7) g;
        -- thing 6's owner exists nowhere; thing 7's name clashes with a thing the tenant has.
        UPDATE public.thing SET owner_id = {o6} WHERE id = {t6};
        UPDATE public.thing SET owner_id = {o1}, name = 'mine' WHERE id = {t7};
        RESET session_replication_role;
        INSERT INTO tenant_a.owner VALUES ({o1}, 'owner 1');
        INSERT INTO tenant_a.thing VALUES ({t99}, {o1}, 'mine');",
        both("CREATE TABLE {s}.owner (id uuid PRIMARY KEY, name text)"),
        both("CREATE TABLE {s}.thing (id uuid PRIMARY KEY, owner_id uuid NOT NULL REFERENCES {s}.owner (id), name text UNIQUE)"),
        o1 = "'d0000000-0000-0000-0000-000000000001'",
        o6 = "'d0000000-0000-0000-0000-000000000066'",
        t6 = u(6),
        t7 = u(7),
        t99 = u(99),
    );
    let url = fixture_db("heal_graph_set_aside", &sql).await;
    // Batches of two: the broken key and the clash share batches with good keys.
    let out = heal(&url, "heal_graph_set_aside", "batch_size = 2\n");
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "copy_missing_parents: 9 change(s)",
            "set aside tenant_a.refs key (c0000000-0000-0000-0000-000000000006): owner(id) = (d0000000-0000-0000-0000-000000000066) exists in neither the tenant nor the shared schema",
            "set aside tenant_a.refs key (c0000000-0000-0000-0000-000000000007): duplicate key value violates unique constraint \"thing_name_key\"",
            stdout.lines().last().unwrap(),
        ]
    );
    // Five things and the four owners the tenant lacked.
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s', table_name, count(*)) FROM tenant_audit.heal_log GROUP BY table_name ORDER BY 1"
        )
        .await,
        ["owner 4", "thing 5"]
    );
    let report = scan(&config(&url, COPY)).await;
    assert_eq!(
        lines(&report.findings),
        ["orphan_rows tenant_a.refs(thing_id) 2 -> tenant_a.thing Shared Constraint [\"c0000000-0000-0000-0000-000000000006\", \"c0000000-0000-0000-0000-000000000007\"]"]
    );
}

/// A copied parent's columns that name rows of other tables through a relationship without a
/// constraint (`checks.relationships`, Django's `db_constraint=False`) follow the same rules as
/// its foreign keys: an integer key of the shared schema names another row in the tenant (here
/// the tenant's unrelated region 3), so that parent is set aside, never copied with it; a uuid
/// one is copied with its ancestors; a NULL names nothing.
#[tokio::test]
async fn configured_relationships_of_a_copied_row_follow_the_same_entity_rules() {
    let u = |n: u32| format!("'e0000000-0000-0000-0000-{n:012}'");
    let sql = format!(
        "SELECT pg_temp.create_tenant('tenant_a');
        {}{}{}
        CREATE TABLE tenant_a.refs (id serial PRIMARY KEY, shop_id uuid REFERENCES tenant_a.shop (id));
        INSERT INTO public.region (id, name) SELECT g, 'shared region ' || g FROM generate_series(1, 3) g;
        INSERT INTO tenant_a.region (id, name) SELECT g, 'own region ' || g FROM generate_series(1, 3) g;
        INSERT INTO public.owner VALUES ({o1}, 'owner 1', {o2}), ({o2}, 'owner 2', NULL);
        INSERT INTO public.shop VALUES ({s1}, 'shop 1', 3, {o1}), ({s2}, 'shop 2', NULL, {o1});
        SET session_replication_role = replica;
        INSERT INTO tenant_a.refs (shop_id) VALUES ({s1}), ({s2});
        RESET session_replication_role;",
        both("CREATE TABLE {s}.region (id serial PRIMARY KEY, name text NOT NULL)"),
        both("CREATE TABLE {s}.owner (id uuid PRIMARY KEY, name text, boss_id uuid)"),
        both("CREATE TABLE {s}.shop (id uuid PRIMARY KEY, name text, region_id int, owner_id uuid)"),
        o1 = u(1),
        o2 = u(2),
        s1 = u(11),
        s2 = u(12),
    );
    let url = fixture_db("heal_graph_configured", &sql).await;
    let relationships = "[[checks.relationships]]\ntable = 'shop'\ncolumns = ['region_id']\nparent_table = 'region'\nparent_columns = ['id']\n\
        [[checks.relationships]]\ntable = 'shop'\ncolumns = ['owner_id']\nparent_table = 'owner'\nparent_columns = ['id']\n\
        [[checks.relationships]]\ntable = 'owner'\ncolumns = ['boss_id']\nparent_table = 'owner'\nparent_columns = ['id']\n";
    let path = config_file("heal_graph_configured", &format!("database_url = {url:?}\n{COPY}{relationships}"));
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        stdout.lines().collect::<Vec<_>>(),
        [
            "copy_missing_parents: 3 change(s)",
            "set aside tenant_a.refs key (e0000000-0000-0000-0000-000000000011): region(id) = (3) (the configured relationship shop(region_id)) is not a same-entity key (not a uuid, not in heal.same_entity_keys): the row it names in the shared schema is another entity than the tenant's",
            stdout.lines().last().unwrap(),
        ]
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s', id, name, coalesce(region_id::text, 'NULL')) FROM tenant_a.shop").await,
        ["e0000000-0000-0000-0000-000000000012 shop 2 NULL"],
        "shop 1 would have pointed at the tenant's own region 3"
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s', name, coalesce(boss_id::text, 'NULL')) FROM tenant_a.owner ORDER BY name")
            .await,
        ["owner 1 e0000000-0000-0000-0000-000000000002", "owner 2 NULL"],
        "the uuid relationship is followed to its ancestor"
    );
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.region WHERE id = 3").await, ["own region 3"]);
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s', table_name, row_key) FROM tenant_audit.heal_log ORDER BY table_name, row_key::text"
        )
        .await,
        [
            "owner {\"id\": \"e0000000-0000-0000-0000-000000000001\"}",
            "owner {\"id\": \"e0000000-0000-0000-0000-000000000002\"}",
            "shop {\"id\": \"e0000000-0000-0000-0000-000000000012\"}",
        ]
    );
}
