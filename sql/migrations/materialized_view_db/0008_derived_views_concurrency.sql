-- What concurrent writers taught the derived views (0004-0007).
--
-- 1. user_activity_refresh locks every user's key, also where no row of it exists yet.
--
-- The refresh of 0006 locked only the rows it could see and inserted rows only for users it could
-- see in user_view. A transaction re-creating a deleted user (a replay, SQL by hand) and one
-- writing a post of that id could then commit side by side: neither saw the other's new rows, so
-- neither waited, and user_activity kept the user without the post. Now the key itself is the
-- lock: a row that exists is locked FOR UPDATE, a key without one is locked by inserting its row
-- (a placeholder when the user is not in user_view, deleted again before commit). An insert of a
-- key another open transaction inserted waits for it; so every two writers of one user queue.
--
-- Locks and inserts are one attempt, in key order; when the attempt meets a row another
-- transaction committed meanwhile, it is undone as a whole (its locks too) and tried again, so a
-- transaction never waits while holding a key above the one it waits for: no deadlocks. Then, in
-- a statement started after every lock, every locked row is recomputed from user_view and
-- post_stats, the inserted ones too (an insert that waited for another transaction read before
-- that one committed).
--
-- The users' post_stats rows need no lock of their own: whoever changes them locks the user's key
-- here before it reads anything.
--
-- 2. The notes compare what an UPDATE removed and added as sets, not row by row on the key: an
-- update of the key itself (a post's id, a user's user_id) was missed.
--
-- 3. A writer of posts or user_view holds both tables (ACCESS SHARE) from its first write on: the
-- refresh at its commit reads both, and taking the second only there, after row locks, deadlocked
-- against a TRUNCATE by hand in another transaction.
--
-- 4. Writers must run under READ COMMITTED: the refresh reads what others committed up to its own
-- locks, which a REPEATABLE READ or SERIALIZABLE snapshot, taken earlier, does not show (and a
-- SERIALIZABLE writer's conflict checks do not cover the READ COMMITTED ones of post-api and the
-- projector). Other levels are refused with an error, at the write.

CREATE OR REPLACE FUNCTION user_activity_refresh(users bigint[]) RETURNS user_activity_change[]
LANGUAGE plpgsql AS $$
DECLARE
    keys bigint[];
    before user_activity[];
    created user_activity[];
    stale bigint[];
    changes user_activity_change[];
    stale_changes user_activity_change[];
BEGIN
    keys := CASE WHEN users IS NULL
                 THEN ARRAY(SELECT user_id FROM user_activity UNION SELECT user_id FROM user_view
                            ORDER BY 1)
                 ELSE ARRAY(SELECT DISTINCT u FROM unnest(users) AS u ORDER BY u) END;
    IF cardinality(keys) = 0 THEN
        RETURN '{}';
    END IF;
    LOOP
        BEGIN
            -- The rows that exist, kept as they were...
            before := ARRAY(SELECT a FROM user_activity a WHERE a.user_id = ANY(keys)
                            ORDER BY a.user_id FOR UPDATE);
            -- ...and a row for every other key, as far as this statement can tell.
            WITH new AS (
                INSERT INTO user_activity AS a (user_id, name, department, status, post_count,
                                                last_post_at, last_profile_change_at)
                SELECT k, coalesce(u.name, ''), coalesce(u.department, ''),
                       coalesce(u.status, ''), coalesce(s.post_count, 0), s.last_post_at,
                       coalesce(u.updated_at, '-infinity')
                  FROM unnest(keys) AS k
                  LEFT JOIN user_view u ON u.user_id = k
                  LEFT JOIN post_stats s ON s.author_id = k
                 WHERE k NOT IN (SELECT b.user_id FROM unnest(before) AS b)
                 ORDER BY k
                RETURNING a
            )
            SELECT coalesce(array_agg(n.a), '{}') INTO created FROM new AS n;
            EXIT;
        EXCEPTION WHEN unique_violation THEN
            -- Another transaction committed a row of these keys since the attempt began.
        END;
    END LOOP;
    -- The inserted rows whose user or posts another transaction changed since the insert read
    -- them, and the placeholders.
    stale := ARRAY(
        SELECT c.user_id
          FROM unnest(created) AS c
          LEFT JOIN user_view u ON u.user_id = c.user_id
          LEFT JOIN post_stats s ON s.author_id = c.user_id
         WHERE u.user_id IS NULL
            OR (c.name, c.department, c.status, c.post_count, c.last_post_at,
                c.last_profile_change_at)
               IS DISTINCT FROM (u.name, u.department, u.status, coalesce(s.post_count, 0),
                                 s.last_post_at, u.updated_at));
    -- The other inserted rows are new as they are.
    changes := ARRAY(
        SELECT ROW(c.user_id, NULL, NULL, NULL, NULL, c.department, c.status, c.post_count,
                   c.last_post_at)::user_activity_change
          FROM unnest(created) AS c
         WHERE c.user_id NOT IN (SELECT unnest(stale)));
    IF cardinality(before) = 0 AND cardinality(stale) = 0 THEN
        RETURN changes;
    END IF;
    -- Each row's old values ride along to RETURNING: no join between what was read and what
    -- was written, whose sizes a cached plan cannot know.
    WITH old AS (
        SELECT b.*, true AS existed FROM unnest(before) AS b
        UNION ALL
        SELECT c.*, false FROM unnest(created) AS c WHERE c.user_id IN (SELECT unnest(stale))
    ), source AS MATERIALIZED (
        SELECT o.user_id, o.existed, o.department AS old_department, o.status AS old_status,
               o.post_count AS old_post_count, o.last_post_at AS old_last_post_at,
               u.user_id IS NOT NULL AS present, u.name, u.department, u.status,
               coalesce(s.post_count, 0) AS post_count, s.last_post_at, u.updated_at
          FROM old o
          LEFT JOIN user_view u ON u.user_id = o.user_id
          LEFT JOIN post_stats s ON s.author_id = o.user_id
    ), gone AS (
        DELETE FROM user_activity a
         USING source s
         WHERE a.user_id = s.user_id AND NOT s.present
        RETURNING s.*
    ), written AS (
        UPDATE user_activity a
           SET name = s.name, department = s.department, status = s.status,
               post_count = s.post_count, last_post_at = s.last_post_at,
               last_profile_change_at = s.updated_at
          FROM source s
         WHERE a.user_id = s.user_id AND s.present
           AND (a.name, a.department, a.status, a.post_count, a.last_post_at,
                a.last_profile_change_at)
               IS DISTINCT FROM (s.name, s.department, s.status, s.post_count, s.last_post_at,
                                 s.updated_at)
        RETURNING s.*
    )
    -- A row that existed and is gone or rewritten, or a new one rewritten (the others new here
    -- are in changes already; a placeholder is new and gone: it never was). A stale row is
    -- always one of the two: no one changes what it is computed from while its key is locked.
    SELECT coalesce(array_agg(ROW(c.user_id,
                                  CASE WHEN c.existed THEN c.old_department END,
                                  CASE WHEN c.existed THEN c.old_status END,
                                  CASE WHEN c.existed THEN c.old_post_count END,
                                  CASE WHEN c.existed THEN c.old_last_post_at END,
                                  c.department, c.status,
                                  CASE WHEN c.present THEN c.post_count END,
                                  CASE WHEN c.present THEN c.last_post_at END
                                 )::user_activity_change), '{}')
      INTO stale_changes
      FROM (SELECT * FROM gone WHERE existed UNION ALL SELECT * FROM written) AS c;
    RETURN changes || stale_changes;
END
$$;

-- Refuses writers the refresh cannot serve (see 4 above) and holds both source tables.
CREATE FUNCTION derived_views_note_begin() RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    IF current_setting('transaction_isolation') <> 'read committed' THEN
        RAISE EXCEPTION 'posts and user_view are written under READ COMMITTED only, not %',
                        upper(current_setting('transaction_isolation'))
            USING ERRCODE = 'feature_not_supported',
                  HINT = 'The derived views (post_stats, user_activity, department_performance) '
                         'are refreshed at commit from what other transactions committed up to '
                         'then, which this isolation level does not show. Use READ COMMITTED, '
                         'the default.';
    END IF;
    LOCK TABLE posts, user_view IN ACCESS SHARE MODE;
END
$$;

CREATE OR REPLACE FUNCTION derived_views_note_posts() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM derived_views_note_begin();
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO derived_views_pending (authors) VALUES (NULL);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO derived_views_pending (authors)
        SELECT array_agg(DISTINCT author_id) FROM added HAVING count(*) > 0;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO derived_views_pending (authors)
        SELECT array_agg(DISTINCT author_id) FROM removed HAVING count(*) > 0;
    ELSE
        -- The authors whose (author, created_at) pairs are not the same after as before: a post
        -- moved, re-dated, or re-keyed; an edit of title or content changes no derived view.
        INSERT INTO derived_views_pending (authors)
        SELECT array_agg(DISTINCT d.author_id)
          FROM ((SELECT author_id, created_at FROM removed
                 EXCEPT ALL SELECT author_id, created_at FROM added)
                UNION ALL
                (SELECT author_id, created_at FROM added
                 EXCEPT ALL SELECT author_id, created_at FROM removed)) AS d
        HAVING count(*) > 0;
    END IF;
    RETURN NULL;
END
$$;

CREATE OR REPLACE FUNCTION derived_views_note_users() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM derived_views_note_begin();
    IF TG_OP = 'TRUNCATE' THEN
        INSERT INTO derived_views_pending (users) VALUES (NULL);
    ELSIF TG_OP = 'INSERT' THEN
        INSERT INTO derived_views_pending (users)
        SELECT array_agg(user_id) FROM added HAVING count(*) > 0;
    ELSIF TG_OP = 'DELETE' THEN
        INSERT INTO derived_views_pending (users)
        SELECT array_agg(user_id) FROM removed HAVING count(*) > 0;
    ELSE
        -- The users whose row differs in what a derived view shows (a replayed event that
        -- leaves those columns as they were changes nothing), the key included.
        INSERT INTO derived_views_pending (users)
        SELECT array_agg(DISTINCT d.user_id)
          FROM ((SELECT user_id, name, department, status, updated_at FROM removed
                 EXCEPT SELECT user_id, name, department, status, updated_at FROM added)
                UNION ALL
                (SELECT user_id, name, department, status, updated_at FROM added
                 EXCEPT SELECT user_id, name, department, status, updated_at FROM removed)) AS d
        HAVING count(*) > 0;
    END IF;
    RETURN NULL;
END
$$;
