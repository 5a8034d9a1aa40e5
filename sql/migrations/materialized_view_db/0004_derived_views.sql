-- Views derived from what post-api owns (posts) and what the projector keeps (user_view), exact at
-- every commit whoever writes (post-api, the projector, a replay, SQL by hand).
--
-- Each derived view is a table <name> with a plain view <name>_definition beside it that says what
-- the table must equal; derived_views lists them in the order they are refreshed and repaired (a
-- view after the views it reads).
--
-- How they stay exact: statement triggers on posts and user_view note the authors and users a
-- transaction changed (derived_views_pending). At commit a deferred trigger runs
-- derived_views_refresh(authors, users) once, which recomputes the rows of those keys view after
-- view. Every transaction takes its locks on derived rows only there, in one order (post_stats,
-- then user_activity, then department_performance, each by key), and only after the locks does it
-- read what it recomputes from, so a concurrent writer of the same key waits and then sees the
-- other's committed rows: post-api and the projector never deadlock on them, and never undo each
-- other's work.

CREATE TABLE derived_views (
    name     text    PRIMARY KEY,
    -- The column that identifies a row.
    key      text    NOT NULL,
    position integer NOT NULL UNIQUE
);

-- Keys changed by open transactions; a transaction's rows are taken at its commit. Unlogged:
-- nothing in it outlives the transaction that wrote it.
CREATE UNLOGGED TABLE derived_views_pending (
    tx      xid8     NOT NULL DEFAULT pg_current_xact_id(),
    -- NULL: every key (a TRUNCATE).
    authors bigint[] DEFAULT '{}',
    users   bigint[] DEFAULT '{}'
);
CREATE INDEX derived_views_pending_tx_idx ON derived_views_pending (tx);

-- Brings the derived views' rows of these keys in line (NULL: every key; a key may come more than
-- once, in any order). Redefined by each migration that adds a view, to call that view's refresh in
-- its place.
CREATE FUNCTION derived_views_refresh(authors bigint[], users bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
END
$$;

-- Runs at commit, once per row of derived_views_pending: the first run of a transaction takes all
-- of its rows, the others find none.
CREATE FUNCTION derived_views_flush() RETURNS trigger
LANGUAGE plpgsql AS $$
DECLARE
    authors bigint[];
    users bigint[];
    taken bigint;
BEGIN
    WITH mine AS (
        DELETE FROM derived_views_pending WHERE tx = pg_current_xact_id()
        RETURNING derived_views_pending.authors, derived_views_pending.users
    )
    SELECT count(*),
           CASE WHEN bool_or(m.authors IS NULL) THEN NULL
                ELSE ARRAY(SELECT a FROM mine, unnest(mine.authors) AS a) END,
           CASE WHEN bool_or(m.users IS NULL) THEN NULL
                ELSE ARRAY(SELECT u FROM mine, unnest(mine.users) AS u) END
      INTO taken, authors, users
      FROM mine AS m;
    IF taken > 0 THEN
        PERFORM derived_views_refresh(authors, users);
    END IF;
    RETURN NULL;
END
$$;

CREATE CONSTRAINT TRIGGER derived_views_flush AFTER INSERT ON derived_views_pending
    DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION derived_views_flush();

-- The authors whose posts a statement added, removed or moved (an edit of title or content
-- changes no derived view).
CREATE FUNCTION derived_views_note_posts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO derived_views_pending (authors) VALUES (NULL);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO derived_views_pending (authors)
        SELECT array_agg(DISTINCT author_id) FROM added HAVING count(*) > 0;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO derived_views_pending (authors)
        SELECT array_agg(DISTINCT author_id) FROM removed HAVING count(*) > 0;
    ELSE
        INSERT INTO derived_views_pending (authors)
        SELECT array_agg(DISTINCT a)
          FROM removed o JOIN added n ON n.id = o.id,
               LATERAL (VALUES (o.author_id), (n.author_id)) AS v(a)
         WHERE (o.author_id, o.created_at) IS DISTINCT FROM (n.author_id, n.created_at)
        HAVING count(*) > 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER derived_views_posts_insert AFTER INSERT ON posts
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION derived_views_note_posts();
CREATE TRIGGER derived_views_posts_update AFTER UPDATE ON posts
    REFERENCING OLD TABLE AS removed NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION derived_views_note_posts();
CREATE TRIGGER derived_views_posts_delete AFTER DELETE ON posts
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION derived_views_note_posts();
CREATE TRIGGER derived_views_posts_truncate AFTER TRUNCATE ON posts
    FOR EACH STATEMENT EXECUTE FUNCTION derived_views_note_posts();

-- The users a statement added, removed or changed in what a derived view shows (a replayed event
-- that leaves those columns as they were changes nothing).
CREATE FUNCTION derived_views_note_users() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO derived_views_pending (users) VALUES (NULL);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO derived_views_pending (users)
        SELECT array_agg(user_id) FROM added HAVING count(*) > 0;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO derived_views_pending (users)
        SELECT array_agg(user_id) FROM removed HAVING count(*) > 0;
    ELSE
        INSERT INTO derived_views_pending (users)
        SELECT array_agg(DISTINCT a)
          FROM removed o JOIN added n ON n.user_id = o.user_id,
               LATERAL (VALUES (o.user_id), (n.user_id)) AS v(a)
         WHERE (o.user_id, o.name, o.department, o.status, o.updated_at)
               IS DISTINCT FROM (n.user_id, n.name, n.department, n.status, n.updated_at)
        HAVING count(*) > 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE TRIGGER derived_views_users_insert AFTER INSERT ON user_view
    REFERENCING NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION derived_views_note_users();
CREATE TRIGGER derived_views_users_update AFTER UPDATE ON user_view
    REFERENCING OLD TABLE AS removed NEW TABLE AS added
    FOR EACH STATEMENT EXECUTE FUNCTION derived_views_note_users();
CREATE TRIGGER derived_views_users_delete AFTER DELETE ON user_view
    REFERENCING OLD TABLE AS removed
    FOR EACH STATEMENT EXECUTE FUNCTION derived_views_note_users();
CREATE TRIGGER derived_views_users_truncate AFTER TRUNCATE ON user_view
    FOR EACH STATEMENT EXECUTE FUNCTION derived_views_note_users();

-- Makes the table of a derived view equal to its definition: deletes the rows that differ from it
-- or should not be there, inserts the missing ones. Returns the number of rows written. A full
-- comparison: for replays and repairs, not for every change. The caller keeps writers out (e.g.
-- LOCK TABLE posts IN SHARE MODE, and the projector paused).
CREATE FUNCTION derived_view_repair(view_name text) RETURNS bigint
LANGUAGE plpgsql AS $$
DECLARE
    v derived_views;
    columns text;
    deleted bigint;
    inserted bigint;
BEGIN
    SELECT * INTO STRICT v FROM derived_views WHERE name = view_name;
    SELECT string_agg(quote_ident(attname), ', ' ORDER BY attnum) INTO columns
      FROM pg_attribute
     WHERE attrelid = v.name::regclass AND attnum > 0 AND NOT attisdropped AND attgenerated = '';
    EXECUTE format('DELETE FROM %1$I WHERE %2$I IN '
                   '(SELECT %2$I FROM (TABLE %1$I EXCEPT TABLE %3$I) AS wrong)',
                   v.name, v.key, v.name || '_definition');
    GET DIAGNOSTICS deleted = ROW_COUNT;
    EXECUTE format('INSERT INTO %1$I (%4$s) SELECT %4$s FROM %3$I WHERE %2$I IN '
                   '(SELECT %2$I FROM (TABLE %3$I EXCEPT TABLE %1$I) AS missing)',
                   v.name, v.key, v.name || '_definition', columns);
    GET DIAGNOSTICS inserted = ROW_COUNT;
    RETURN deleted + inserted;
END
$$;
