//! `copy_missing_parents` under a hostile DBA's review, against real PostgreSQL: which rows a
//! copy reads (inheritance, partitions), which values it writes (sequences), what its plan names,
//! and how it survives a row that cannot be written.

use crate::support::{fixture_db, heal_cli, pg, rows};

/// `heal ARGS` with `[tenants] include = ['^tenant_']` and the `[heal]` keys `heal`: (exit code,
/// stdout with the run id cut from its total line, stderr).
fn heal(url: &str, name: &str, heal: &str, args: &[&str]) -> (Option<i32>, Vec<String>, String) {
    heal_cli(name, &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\n{heal}"), args)
}

const COPY: &str = "copy_missing_parents = true\n";

/// `uuid` `n` as text: `00000000-0000-0000-0000-00000000000n`.
fn id(n: u32) -> String {
    format!("00000000-0000-0000-0000-{n:012}")
}

/// Foreign keys never see inheritance children, but do see partitions. The shared `region` has
/// an archive child holding region 1 (shop 1's region): a copy must not take it from there (shop
/// 1 is set aside). The tenant's `region` has an old child holding region 3: the tenant's key
/// does not see it, so region 3 is copied. The tenant's `orders` has an old child with an order
/// of shop 4: its parent's foreign key does not cover it, the scan does not count it, and heal
/// does not copy shop 4. The shared `brand` is partitioned: brand 1 lives in its partition and
/// is copied.
#[tokio::test]
async fn a_copy_reads_neither_shared_nor_tenant_inheritance_children() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.region (id uuid PRIMARY KEY, name text);
        CREATE TABLE public.region_archive () INHERITS (public.region);
        CREATE TABLE public.brand (id uuid PRIMARY KEY, name text) PARTITION BY HASH (id);
        CREATE TABLE public.brand_p0 PARTITION OF public.brand FOR VALUES WITH (MODULUS 1, REMAINDER 0);
        CREATE TABLE public.shop (id uuid PRIMARY KEY, region_id uuid, brand_id uuid, name text);
        CREATE TABLE tenant_a.region (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.region_old () INHERITS (tenant_a.region);
        CREATE TABLE tenant_a.brand (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.shop (id uuid PRIMARY KEY, region_id uuid REFERENCES tenant_a.region (id),
          brand_id uuid REFERENCES tenant_a.brand (id), name text);
        CREATE TABLE tenant_a.orders (id serial PRIMARY KEY, shop_id uuid REFERENCES tenant_a.shop (id));
        CREATE TABLE tenant_a.orders_old () INHERITS (tenant_a.orders);
        INSERT INTO public.region_archive VALUES ('00000000-0000-0000-0000-000000000001', 'archived 1');
        INSERT INTO public.region VALUES ('00000000-0000-0000-0000-000000000002', 'shared 2'),
          ('00000000-0000-0000-0000-000000000003', 'shared 3');
        INSERT INTO public.brand VALUES ('00000000-0000-0000-0000-000000000001', 'brand 1');
        INSERT INTO tenant_a.region_old VALUES ('00000000-0000-0000-0000-000000000003', 'old 3');
        INSERT INTO public.shop VALUES
          ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-000000000001', NULL, 'shop 1'),
          ('00000000-0000-0000-0000-000000000002', '00000000-0000-0000-0000-000000000002',
           '00000000-0000-0000-0000-000000000001', 'shop 2'),
          ('00000000-0000-0000-0000-000000000003', '00000000-0000-0000-0000-000000000003', NULL, 'shop 3'),
          ('00000000-0000-0000-0000-000000000004', NULL, NULL, 'shop 4');
        SET session_replication_role = replica;
        INSERT INTO tenant_a.orders (shop_id) VALUES ('00000000-0000-0000-0000-000000000001'),
          ('00000000-0000-0000-0000-000000000002'), ('00000000-0000-0000-0000-000000000003');
        INSERT INTO tenant_a.orders_old (shop_id) VALUES ('00000000-0000-0000-0000-000000000004');
        RESET session_replication_role;";
    let url = fixture_db("copy_review_inheritance", sql).await;
    let (code, stdout, stderr) = heal(&url, "copy_review_inheritance", COPY, &["--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stdout,
        [
            "copy_missing_parents: 5 change(s)".to_string(),
            format!(
                "set aside tenant_a.orders key ({}): region(id) = ({}) exists in neither the tenant nor the shared schema",
                id(1),
                id(1)
            ),
            "heal run: 5 change(s), 0 tenant(s) skipped, 0 error(s)".to_string(),
        ]
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s', tableoid::regclass, name) FROM tenant_a.region ORDER BY id, tableoid").await,
        ["tenant_a.region shared 2", "tenant_a.region shared 3", "tenant_a.region_old old 3"]
    );
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.shop ORDER BY id").await, ["shop 2", "shop 3"]);
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.brand ORDER BY id").await, ["brand 1"]);
}

/// Columns named like every alias of heal's copy and undo statements (`c`, `p`, `s`, `t`, `v`,
/// `i`, `x`, `d`, `g`, `l`, `m`, `q`, `ord`): the audit row keeps the copied row itself (a bare
/// `to_jsonb(i)` would read the column `i`), and undo deletes it.
#[tokio::test]
async fn columns_named_like_the_aliases_heal_uses_change_nothing() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.tag (id uuid PRIMARY KEY, c text, p text, s text, t text, v text, i text, x text,
          d text, g text, l text, m text, q text, ord text);
        CREATE TABLE tenant_a.tag (LIKE public.tag INCLUDING ALL);
        CREATE TABLE tenant_a.note (id serial PRIMARY KEY, tag_id uuid REFERENCES tenant_a.tag (id));
        INSERT INTO public.tag VALUES ('00000000-0000-0000-0000-000000000001',
          'c1', 'p1', 's1', 't1', 'v1', 'i1', 'x1', 'd1', 'g1', 'l1', 'm1', 'q1', 'ord1');
        SET session_replication_role = replica;
        INSERT INTO tenant_a.note (tag_id) VALUES ('00000000-0000-0000-0000-000000000001');
        RESET session_replication_role;";
    let url = fixture_db("copy_review_aliases", sql).await;
    let (code, stdout, stderr) = heal(&url, "copy_review_aliases", COPY, &["--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["copy_missing_parents: 1 change(s)", "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(
        rows(&url, "SELECT format('%s %s', row_key, new_value) FROM tenant_audit.heal_log").await,
        [format!(
            "{{\"id\": \"{}\"}} {{\"c\": \"c1\", \"d\": \"d1\", \"g\": \"g1\", \"i\": \"i1\", \"l\": \"l1\", \"m\": \"m1\", \"p\": \"p1\", \"q\": \"q1\", \"s\": \"s1\", \"t\": \"t1\", \"v\": \"v1\", \"x\": \"x1\", \"id\": \"{}\", \"ord\": \"ord1\"}}",
            id(1),
            id(1)
        )]
    );
    let run: Vec<String> = rows(&url, "SELECT DISTINCT run_id FROM tenant_audit.heal_log").await;
    pg::connect(&url).await.batch_execute("DELETE FROM tenant_a.note").await.unwrap();
    let (code, stdout, stderr) = heal(&url, "copy_review_aliases_undo", COPY, &["--undo", &run[0], "--execute"]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(stdout, ["undo: 1 change(s)", "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.tag").await, ["0"]);
}

/// An `AFTER` trigger refuses some rows with SQLSTATE 54000 (outside the classes of a
/// constraint): their keys are set aside, the others copied. Tag 50 of 100 fails: the batch is
/// bisected, and the rows are written in 7 statements of one transaction (each a savepoint that
/// keeps its subtransaction; key by key would have kept 99). All 40 labels fail: 79 attempts
/// would be needed in one transaction; batches stop at 32 savepoints and the next one goes on
/// after the last key tried, so every label is set aside once, in key order.
#[tokio::test]
async fn a_row_a_trigger_refuses_is_set_aside_and_savepoints_stay_bounded() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE SCHEMA trace;
        CREATE TABLE trace.statements (xid bigint);
        CREATE FUNCTION trace.refuse() RETURNS trigger LANGUAGE plpgsql AS $$
          BEGIN IF NEW.name = 'bad' THEN RAISE EXCEPTION 'row % is refused', NEW.id USING ERRCODE = '54000'; END IF;
          RETURN NULL; END $$;
        CREATE FUNCTION trace.statement() RETURNS trigger LANGUAGE plpgsql AS $$
          BEGIN INSERT INTO trace.statements VALUES (txid_current()); RETURN NULL; END $$;
        CREATE TABLE public.tag (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.tag (id uuid PRIMARY KEY, name text);
        CREATE TABLE public.label (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.label (id uuid PRIMARY KEY, name text);
        CREATE TRIGGER refuse AFTER INSERT ON tenant_a.tag FOR EACH ROW EXECUTE FUNCTION trace.refuse();
        CREATE TRIGGER refuse AFTER INSERT ON tenant_a.label FOR EACH ROW EXECUTE FUNCTION trace.refuse();
        CREATE TRIGGER statement AFTER INSERT ON tenant_a.tag FOR EACH STATEMENT EXECUTE FUNCTION trace.statement();
        CREATE TABLE tenant_a.note (id serial PRIMARY KEY, tag_id uuid REFERENCES tenant_a.tag (id),
          label_id uuid REFERENCES tenant_a.label (id));
        INSERT INTO public.tag SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid,
          CASE WHEN g = 50 THEN 'bad' ELSE 'tag ' || g END FROM generate_series(1, 100) g;
        INSERT INTO public.label SELECT ('00000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid, 'bad'
          FROM generate_series(1, 40) g;
        SET session_replication_role = replica;
        INSERT INTO tenant_a.note (tag_id) SELECT id FROM public.tag;
        INSERT INTO tenant_a.note (label_id) SELECT id FROM public.label;
        RESET session_replication_role;";
    let url = fixture_db("copy_review_refused_row", sql).await;
    let (code, stdout, stderr) = heal(&url, "copy_review_refused_row", COPY, &["--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    let mut expected = vec!["copy_missing_parents: 99 change(s)".to_string()];
    expected.extend((1..=40).map(|n| format!("set aside tenant_a.note key ({}): row {} is refused", id(n), id(n))));
    expected.push(format!("set aside tenant_a.note key ({}): row {} is refused", id(50), id(50)));
    expected.push("heal run: 99 change(s), 0 tenant(s) skipped, 0 error(s)".to_string());
    assert_eq!(stdout, expected);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.tag").await, ["99"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.label").await, ["0"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM trace.statements GROUP BY xid").await, ["7"]);
}

/// A copied row's `serial` and identity columns outside the key take the tenant's next numbers
/// (4, after its own 1..3), not the shared row's 100: no sequence jumps, no number repeats. The
/// plan says so per column. An `invoice` whose serial `number` is unique is set aside: heal
/// does not renumber a key.
#[tokio::test]
async fn a_copied_row_takes_the_tenants_next_number_outside_its_key() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.ticket (id uuid PRIMARY KEY, number serial, seq_no int GENERATED ALWAYS AS IDENTITY,
          title text);
        CREATE TABLE tenant_a.ticket (id uuid PRIMARY KEY, number serial, seq_no int GENERATED ALWAYS AS IDENTITY,
          title text);
        CREATE TABLE public.invoice (id uuid PRIMARY KEY, number serial UNIQUE);
        CREATE TABLE tenant_a.invoice (id uuid PRIMARY KEY, number serial UNIQUE);
        CREATE TABLE tenant_a.comment (id serial PRIMARY KEY, ticket_id uuid REFERENCES tenant_a.ticket (id),
          invoice_id uuid REFERENCES tenant_a.invoice (id));
        INSERT INTO tenant_a.ticket (id, title) SELECT ('10000000-0000-0000-0000-' || lpad(g::text, 12, '0'))::uuid,
          'own ' || g FROM generate_series(1, 3) g;
        INSERT INTO public.ticket (id, number, seq_no, title) OVERRIDING SYSTEM VALUE
          VALUES ('00000000-0000-0000-0000-000000000001', 100, 100, 'shared');
        INSERT INTO public.invoice VALUES ('00000000-0000-0000-0000-000000000002', 100);
        SET session_replication_role = replica;
        INSERT INTO tenant_a.comment (ticket_id, invoice_id) VALUES ('00000000-0000-0000-0000-000000000001', NULL),
          (NULL, '00000000-0000-0000-0000-000000000002');
        RESET session_replication_role;";
    let url = fixture_db("copy_review_numbers", sql).await;
    let (code, plan, stderr) = heal(&url, "copy_review_numbers", COPY, &[]);
    assert_eq!(code, Some(0), "{stderr}");
    assert_eq!(
        plan.iter()
            .filter(|l| l.contains("next value"))
            .collect::<Vec<_>>(),
        ["-- ticket: column(s) number, seq_no take the tenant's next value (they draw from its own sequence), not the shared row's"]
    );
    let (code, stdout, stderr) = heal(&url, "copy_review_numbers", COPY, &["--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stdout,
        [
            "copy_missing_parents: 1 change(s)".to_string(),
            format!("set aside tenant_a.comment key ({}): invoice(id) = ({}) cannot be copied: its column(s) number draw from the tenant's own sequence, so a copy takes the tenant's next value, but they are a unique key or a key the tenant's rows reference: heal does not renumber them", id(2), id(2)),
            "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)".to_string(),
        ]
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s %s', number, seq_no, title) FROM tenant_a.ticket ORDER BY number").await,
        ["1 1 own 1", "2 2 own 2", "3 3 own 3", "4 4 shared"]
    );
    assert_eq!(
        rows(
            &url,
            "SELECT format('%s %s', (SELECT last_value FROM tenant_a.ticket_number_seq), (SELECT last_value FROM tenant_a.ticket_seq_no_seq))"
        )
        .await,
        ["4 4"]
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s', repair, row_key) FROM tenant_audit.heal_log").await,
        [format!("copy_missing_parents {{\"id\": \"{}\"}}", id(1))]
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.invoice").await, ["0"]);
}

/// A plan file lists every row its copy writes, ancestors included, at most
/// `heal.max_rows_per_run` of them (3: shop 1 and its region fit, shop 2 with its region would
/// pass it and is left for a later plan). After the plan, the shared shop 1 is moved to region
/// 2: `--apply` would now have to write a region nobody reviewed, so shop 1 is set aside and
/// nothing is written.
#[tokio::test]
async fn a_plan_file_lists_the_rows_a_copy_writes_and_apply_writes_no_other() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE public.region (id uuid PRIMARY KEY, name text);
        CREATE TABLE public.shop (id uuid PRIMARY KEY, region_id uuid, name text);
        CREATE TABLE tenant_a.region (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.shop (id uuid PRIMARY KEY, region_id uuid REFERENCES tenant_a.region (id), name text);
        CREATE TABLE tenant_a.orders (id serial PRIMARY KEY, shop_id uuid REFERENCES tenant_a.shop (id));
        INSERT INTO public.region VALUES ('00000000-0000-0000-0000-000000000001', 'region 1'),
          ('00000000-0000-0000-0000-000000000002', 'region 2');
        INSERT INTO public.shop VALUES
          ('00000000-0000-0000-0000-000000000001', '00000000-0000-0000-0000-000000000001', 'shop 1'),
          ('00000000-0000-0000-0000-000000000002', '00000000-0000-0000-0000-000000000002', 'shop 2');
        SET session_replication_role = replica;
        INSERT INTO tenant_a.orders (shop_id) VALUES ('00000000-0000-0000-0000-000000000001'),
          ('00000000-0000-0000-0000-000000000002');
        RESET session_replication_role;";
    let url = fixture_db("copy_review_plan_rows", sql).await;
    let config = "copy_missing_parents = true\nmax_rows_per_run = 3\n";
    let file = std::env::temp_dir().join(format!("tenant-audit-it-{}-copy-rows.json", std::process::id()));
    let (code, _, stderr) = heal(&url, "copy_review_plan_rows", config, &["--plan-out", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let plan: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&file).unwrap()).unwrap();
    let copy = &plan["plan"]["tenants"][0]["actions"][0]["steps"][0]["Copy"];
    assert_eq!(copy["only"], serde_json::json!([[id(1)]]));
    assert_eq!(
        copy["rows"],
        serde_json::json!([{ "table": "region", "key": [id(1)] }, { "table": "shop", "key": [id(1)] }])
    );
    let (code, printed, stderr) = heal(&url, "copy_review_plan_rows", config, &["--apply", file.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{stderr}");
    let listing: Vec<String> =
        printed.into_iter().filter(|l| l.starts_with("--   ") || l.contains("and no other")).collect();
    assert_eq!(
        listing,
        [
            "-- the plan file's 1 orphaned key(s), and no other:".to_string(),
            format!("--   ({})", id(1)),
            "-- the 2 row(s) the copy writes for them, and no other (a key that needs another row is set aside):"
                .to_string(),
            format!("--   region(id) = ({})", id(1)),
            format!("--   shop(id) = ({})", id(1)),
        ]
    );

    pg::connect(&url)
        .await
        .batch_execute(
            "UPDATE public.shop SET region_id = '00000000-0000-0000-0000-000000000002'
            WHERE id = '00000000-0000-0000-0000-000000000001'",
        )
        .await
        .unwrap();
    let (code, stdout, stderr) =
        heal(&url, "copy_review_plan_rows", config, &["--apply", file.to_str().unwrap(), "--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stdout,
        [
            "copy_missing_parents: 0 change(s)".to_string(),
            format!("set aside tenant_a.orders key ({}): the copy now needs region(id) = ({}), a row the plan file does not list (the data changed since the plan): make a new plan with --plan-out", id(1), id(2)),
            "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)".to_string(),
        ]
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.region").await, ["0"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.shop").await, ["0"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_audit.heal_log").await, ["0"]);
}

/// A key of a domain over `uuid` is a same-entity key like `uuid` itself: copied. And a `BEFORE
/// INSERT` row trigger on a partition of a partitioned tenant table (which the scan's catalog
/// does not show) fires on the rows routed there: the copy into it is set aside at run time.
#[tokio::test]
async fn a_uuid_domain_key_is_copied_and_a_partitions_before_trigger_is_refused() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE DOMAIN public.uid AS uuid;
        CREATE DOMAIN public.item_uid AS public.uid;
        CREATE TABLE public.item (id public.item_uid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.item (id public.item_uid PRIMARY KEY, name text);
        CREATE TABLE public.event (id uuid PRIMARY KEY, name text);
        CREATE TABLE tenant_a.event (id uuid PRIMARY KEY, name text) PARTITION BY HASH (id);
        CREATE TABLE tenant_a.event_p0 PARTITION OF tenant_a.event FOR VALUES WITH (MODULUS 1, REMAINDER 0);
        CREATE FUNCTION tenant_a.rename() RETURNS trigger LANGUAGE plpgsql AS $$
          BEGIN NEW.name = 'renamed'; RETURN NEW; END $$;
        CREATE TRIGGER rename BEFORE INSERT ON tenant_a.event_p0 FOR EACH ROW EXECUTE FUNCTION tenant_a.rename();
        CREATE TABLE tenant_a.line (id serial PRIMARY KEY, item_id public.item_uid REFERENCES tenant_a.item (id),
          event_id uuid REFERENCES tenant_a.event (id));
        INSERT INTO public.item VALUES ('00000000-0000-0000-0000-000000000001', 'item 1');
        INSERT INTO public.event VALUES ('00000000-0000-0000-0000-000000000002', 'event 2');
        SET session_replication_role = replica;
        INSERT INTO tenant_a.line (item_id, event_id) VALUES ('00000000-0000-0000-0000-000000000001', NULL),
          (NULL, '00000000-0000-0000-0000-000000000002');
        RESET session_replication_role;";
    let url = fixture_db("copy_review_domain_partition", sql).await;
    let (code, stdout, stderr) = heal(&url, "copy_review_domain_partition", COPY, &["--execute"]);
    assert_eq!(code, Some(1), "{stderr}");
    assert_eq!(
        stdout,
        [
            "copy_missing_parents: 1 change(s)".to_string(),
            format!("set aside tenant_a.line key ({}): event(id) = ({}) cannot be copied: BEFORE INSERT trigger(s) event_p0.rename can change or suppress the rows heal writes (heal's audit and undo would not match them); allow each with heal.allow_triggers = [{{ table = ..., trigger = ... }}]", id(2), id(2)),
            "heal run: 1 change(s), 0 tenant(s) skipped, 0 error(s)".to_string(),
        ]
    );
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.item").await, ["item 1"]);
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.event").await, ["0"]);
}
