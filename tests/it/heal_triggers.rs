//! `BEFORE ... FOR EACH ROW` triggers on tables heal writes, against real PostgreSQL: refused by
//! default (the step or key set aside with the trigger's name, exit 1, nothing written), written
//! when `heal.allow_triggers` lists them, and then audited as really written.

use crate::support::{cli, config_file, fixture_db, heal_summary as summary, pg};

async fn rows(url: &str, sql: &str) -> Vec<String> {
    let client = pg::connect(url).await;
    client.query(sql, &[]).await.unwrap().iter().map(|r| r.get(0)).collect()
}

fn config(url: &str, name: &str, heal: &str) -> std::path::PathBuf {
    config_file(name, &format!("database_url = {url:?}\n[tenants]\ninclude = ['^tenant_']\n[heal]\n{heal}"))
}

const COPY_SQL: &str = "SELECT pg_temp.create_tenant('tenant_a');
    CREATE TABLE public.shop (id uuid PRIMARY KEY, name text);
    CREATE TABLE tenant_a.shop (id uuid PRIMARY KEY, name text);
    CREATE TABLE tenant_a.refs (id serial PRIMARY KEY, shop_id uuid REFERENCES tenant_a.shop (id));
    CREATE FUNCTION tenant_a.shout() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN NEW.name := upper(NEW.name); RETURN NEW; END $$;
    CREATE FUNCTION tenant_a.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$;
    CREATE TRIGGER shout BEFORE INSERT ON tenant_a.shop FOR EACH ROW EXECUTE FUNCTION tenant_a.shout();
    CREATE TRIGGER after_log AFTER INSERT ON tenant_a.shop FOR EACH ROW EXECUTE FUNCTION tenant_a.noop();
    INSERT INTO public.shop VALUES ('f0000000-0000-0000-0000-000000000001', 'shop 1');
    SET session_replication_role = replica;
    INSERT INTO tenant_a.refs (shop_id) VALUES ('f0000000-0000-0000-0000-000000000001');
    RESET session_replication_role;";

#[tokio::test]
async fn a_copy_into_a_table_with_a_before_insert_trigger_is_refused_unless_allowed() {
    let url = fixture_db("heal_triggers_copy", COPY_SQL).await;
    let path = config(&url, "heal_triggers_copy", "copy_missing_parents = true\n");
    let plan = cli(&["heal", "--config", path.to_str().unwrap()], &[]);
    assert!(
        String::from_utf8_lossy(&plan.stdout).contains(
            "\n-- fires triggers: tenant_a.shop.after_log (INSERT), tenant_a.shop.shout (refused, not in heal.allow_triggers: BEFORE INSERT)\n"
        ),
        "{}",
        String::from_utf8_lossy(&plan.stdout)
    );
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        summary(&out),
        [
            "copy_missing_parents: 0 change(s)",
            "set aside tenant_a.refs key (f0000000-0000-0000-0000-000000000001): shop(id) = (f0000000-0000-0000-0000-000000000001) cannot be copied: BEFORE INSERT trigger(s) shop.shout can change or suppress the rows heal writes (heal's audit and undo would not match them); allow each with heal.allow_triggers = [{ table = ..., trigger = ... }]",
            "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)",
        ]
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.shop").await, ["0"]);

    // Allowed: copied, and the audit holds the row as the trigger wrote it.
    let path = config(
        &url,
        "heal_triggers_copy_allowed",
        "copy_missing_parents = true\nallow_triggers = [{ table = 'shop', trigger = 'shout' }]\n",
    );
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(rows(&url, "SELECT name FROM tenant_a.shop").await, ["SHOP 1"]);
    assert_eq!(
        rows(&url, "SELECT format('%s %s', row_key, new_value) FROM tenant_audit.heal_log").await,
        ["{\"id\": \"f0000000-0000-0000-0000-000000000001\"} {\"id\": \"f0000000-0000-0000-0000-000000000001\", \"name\": \"SHOP 1\"}"]
    );
}

/// A trigger the scan cannot see (on one partition, created after the plan file was written) is
/// found when the backfill runs: the whole step is set aside before any row is written.
#[tokio::test]
async fn a_backfill_of_a_table_with_a_before_update_trigger_is_refused_unless_allowed() {
    let sql = "SELECT pg_temp.create_tenant('tenant_a');
        CREATE TABLE tenant_a.note (id int PRIMARY KEY, modified_at timestamptz, updated_at timestamptz) PARTITION BY RANGE (id);
        CREATE TABLE tenant_a.note_1 PARTITION OF tenant_a.note FOR VALUES FROM (0) TO (10);
        CREATE TABLE tenant_a.note_2 PARTITION OF tenant_a.note FOR VALUES FROM (10) TO (20);
        INSERT INTO tenant_a.note VALUES (1, '2021-01-01 00:00:00+00', NULL), (11, '2021-01-02 00:00:00+00', NULL);
        CREATE FUNCTION tenant_a.bump() RETURNS trigger LANGUAGE plpgsql AS
          $$ BEGIN NEW.updated_at := NEW.updated_at + interval '1 day'; RETURN NEW; END $$;";
    let url = fixture_db("heal_triggers_backfill", sql).await;
    let path = config(&url, "heal_triggers_backfill", "backfill_null_timestamps = true\n");
    let file = path.with_file_name("plan.json");
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--plan-out", file.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    rows(&url, "CREATE TRIGGER bump BEFORE UPDATE ON tenant_a.note_2 FOR EACH ROW EXECUTE FUNCTION tenant_a.bump()")
        .await;
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--apply", file.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(1), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        summary(&out),
        [
            "set aside tenant_a.note: backfill of updated_at: BEFORE UPDATE trigger(s) note_2.bump can change or suppress the rows heal writes (heal's audit and undo would not match them); allow each with heal.allow_triggers = [{ table = ..., trigger = ... }]",
            "heal run: 0 change(s), 0 tenant(s) skipped, 0 error(s)",
        ]
    );
    assert_eq!(rows(&url, "SELECT count(*)::text FROM tenant_a.note WHERE updated_at IS NULL").await, ["2"]);

    // Allowed by the partitioned table's name: the audit holds what the trigger made of the value.
    let path = config(
        &url,
        "heal_triggers_backfill_allowed",
        "backfill_null_timestamps = true\nallow_triggers = [{ table = 'note', trigger = 'bump' }]\n",
    );
    let out = cli(&["heal", "--config", path.to_str().unwrap(), "--execute"], &[]);
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(
        rows(&url, "SELECT format('%s %s', id, to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI')) FROM tenant_a.note ORDER BY id").await,
        ["1 2021-01-01 00:00", "11 2021-01-03 00:00"]
    );
    assert_eq!(
        rows(&url, "SELECT format('%s %s', row_key, new_value) FROM tenant_audit.heal_log ORDER BY row_key->>'id'")
            .await,
        [
            "{\"id\": 1, \"relation\": \"tenant_a.note_1\"} {\"updated_at\": \"2021-01-01T00:00:00+00:00\"}",
            "{\"id\": 11, \"relation\": \"tenant_a.note_2\"} {\"updated_at\": \"2021-01-03T00:00:00+00:00\"}",
        ]
    );
}
