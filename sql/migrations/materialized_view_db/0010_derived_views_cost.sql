-- What the derived views cost a user change, cut (0004-0008 are what they do; this is how fast).
--
-- A transaction of the projector that adds 1,000 users spent ~6.3 ms in the derived views, more
-- than the ~3.7 ms of writing the users themselves (pgbench, 200 such transactions in one session,
-- so prepared plans' generic forms included): user_activity_refresh read every new row back to
-- find the ones another transaction changed meanwhile (~1 ms) and handed rows from statement to
-- statement as arrays of whole rows; department_performance_apply took ~1.5 ms. Now ~5.1 ms:
--
-- 1. What this transaction holds is not read back. An insert reads what it computes from as it
--    was when the statement began, so a new row is compared again after it (0008: another
--    transaction may have committed in between, e.g. one that held the key with a placeholder).
--    But the users whose user_view rows this transaction wrote (noted from user_view, not from
--    posts) cannot change in user_view under it: it holds those rows, or, deleted, their keys,
--    until it commits. Their new rows are compared again with post_stats only, and with user_view
--    only where the row may be a placeholder (no user: last_profile_change_at is '-infinity').
-- 2. New rows are inserted without posts, and the comparison with post_stats that follows finds
--    the users that have some (rewritten as stale rows are): a new user has none, and the insert
--    no longer reads post_stats for nothing.
-- 3. New rows go from statement to statement as arrays of their columns, not of whole rows.
-- 4. department_performance_apply sums each change's old side and new side in two plain
--    aggregates instead of a lateral join that makes two rows of each change.
--
-- Locks, their order and what is read after them are those of 0008.

DROP FUNCTION user_activity_refresh(bigint[]);

-- Recomputes the rows of these users (NULL: every user) from user_view and post_stats; returns the
-- rows it changed. `held`: users whose user_view rows this transaction wrote (see 1 above).
CREATE FUNCTION user_activity_refresh(users bigint[], held bigint[]) RETURNS user_activity_change[]
LANGUAGE plpgsql AS $$
DECLARE
    keys bigint[];
    before user_activity[];
    ids bigint[];
    names text[];
    departments text[];
    statuses text[];
    post_counts bigint[];
    last_posts timestamptz[];
    profile_changes timestamptz[];
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
    -- One attempt locks the rows that exist and inserts the others, in key order (0008).
    LOOP
        BEGIN
            before := ARRAY(SELECT a FROM user_activity a WHERE a.user_id = ANY(keys)
                            ORDER BY a.user_id FOR UPDATE);
            WITH new AS (
                INSERT INTO user_activity AS a (user_id, name, department, status, post_count,
                                                last_post_at, last_profile_change_at)
                SELECT k, coalesce(u.name, ''), coalesce(u.department, ''),
                       coalesce(u.status, ''), 0, NULL, coalesce(u.updated_at, '-infinity')
                  FROM unnest(keys) AS k
                  LEFT JOIN user_view u ON u.user_id = k
                 WHERE k NOT IN (SELECT b.user_id FROM unnest(before) AS b)
                 ORDER BY k
                RETURNING a.user_id, a.name, a.department, a.status, a.post_count,
                          a.last_post_at, a.last_profile_change_at
            )
            SELECT coalesce(array_agg(n.user_id), '{}'), array_agg(n.name),
                   array_agg(n.department), array_agg(n.status), array_agg(n.post_count),
                   array_agg(n.last_post_at), array_agg(n.last_profile_change_at)
              INTO ids, names, departments, statuses, post_counts, last_posts, profile_changes
              FROM new AS n;
            EXIT;
        EXCEPTION WHEN unique_violation THEN
            -- Another transaction committed a row of these keys since the attempt began.
        END;
    END LOOP;
    -- The inserted rows of users with posts, those whose user another transaction changed since
    -- the insert read them (see 1 above), and the placeholders.
    stale := ARRAY(
        SELECT c.user_id
          FROM unnest(ids, names, departments, statuses, post_counts, last_posts,
                      profile_changes)
               AS c(user_id, name, department, status, post_count, last_post_at,
                    last_profile_change_at)
          LEFT JOIN post_stats s ON s.author_id = c.user_id
         WHERE (c.post_count, c.last_post_at)
               IS DISTINCT FROM (coalesce(s.post_count, 0), s.last_post_at)
            OR ((c.last_profile_change_at = '-infinity'
                 OR c.user_id NOT IN (SELECT unnest(held)))
                AND NOT EXISTS (
                    SELECT 1 FROM user_view u
                     WHERE u.user_id = c.user_id
                       AND (u.name, u.department, u.status, u.updated_at)
                           IS NOT DISTINCT FROM (c.name, c.department, c.status,
                                                 c.last_profile_change_at))));
    -- The other inserted rows are new as they are.
    changes := ARRAY(
        SELECT ROW(c.user_id, NULL, NULL, NULL, NULL, c.department, c.status, c.post_count,
                   c.last_post_at)::user_activity_change
          FROM unnest(ids, departments, statuses, post_counts, last_posts)
               AS c(user_id, department, status, post_count, last_post_at)
         WHERE cardinality(stale) = 0 OR c.user_id NOT IN (SELECT unnest(stale)));
    IF cardinality(before) = 0 AND cardinality(stale) = 0 THEN
        RETURN changes;
    END IF;
    -- Each row's old values ride along to RETURNING (0008).
    WITH old AS (
        SELECT b.user_id, b.department, b.status, b.post_count, b.last_post_at,
               true AS existed
          FROM unnest(before) AS b
        UNION ALL
        SELECT c.user_id, c.department, c.status, c.post_count, c.last_post_at, false
          FROM unnest(ids, departments, statuses, post_counts, last_posts)
               AS c(user_id, department, status, post_count, last_post_at)
         WHERE c.user_id IN (SELECT unnest(stale))
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
    -- As in 0008: a row that existed and is gone or rewritten, or a new one rewritten.
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

-- As 0007's: counts move by deltas; a department that lost a user's last post finds its new last
-- post from the index.
CREATE OR REPLACE FUNCTION department_performance_apply(changes user_activity_change[])
RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    touched text[];
    recheck text[];
BEGIN
    IF coalesce(cardinality(changes), 0) = 0 THEN
        RETURN;
    END IF;
    WITH delta AS (
        SELECT m.department, sum(m.users) AS users, sum(m.active) AS active,
               sum(m.posts) AS posts, max(m.added_last) AS added_last,
               max(m.removed_last) AS removed_last
          FROM (SELECT c.old_department, -count(*),
                       -count(*) FILTER (WHERE c.old_status = 'ACTIVE'),
                       -sum(c.old_post_count), NULL::timestamptz, max(c.old_last_post_at)
                  FROM unnest(changes) AS c
                 WHERE c.old_department IS NOT NULL
                 GROUP BY c.old_department
                UNION ALL
                SELECT c.new_department, count(*),
                       count(*) FILTER (WHERE c.new_status = 'ACTIVE'),
                       sum(c.new_post_count), max(c.new_last_post_at), NULL
                  FROM unnest(changes) AS c
                 WHERE c.new_department IS NOT NULL
                 GROUP BY c.new_department)
               AS m(department, users, active, posts, added_last, removed_last)
         GROUP BY m.department
    ), written AS (
        -- In key order: this is where concurrent writers of one department queue.
        INSERT INTO department_performance AS d (department, user_count, active_users,
                                                 post_count, last_post_at)
        SELECT department, users, active, posts, added_last FROM delta ORDER BY department
            ON CONFLICT (department) DO UPDATE
               SET user_count = d.user_count + excluded.user_count,
                   active_users = d.active_users + excluded.active_users,
                   post_count = d.post_count + excluded.post_count,
                   last_post_at = greatest(d.last_post_at, excluded.last_post_at)
        RETURNING d.department
    )
    SELECT ARRAY(SELECT department FROM written),
           ARRAY(SELECT department FROM delta WHERE removed_last IS NOT NULL)
      INTO touched, recheck;
    UPDATE department_performance d
       SET last_post_at = (SELECT max(a.last_post_at) FROM user_activity a
                            WHERE a.department = d.department)
     WHERE d.department = ANY(recheck);
    DELETE FROM department_performance WHERE department = ANY(touched) AND user_count = 0;
END
$$;

CREATE OR REPLACE FUNCTION derived_views_refresh(authors bigint[], users bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM post_stats_refresh(authors);
    PERFORM department_performance_apply(user_activity_refresh(
        CASE WHEN authors IS NULL OR users IS NULL THEN NULL ELSE authors || users END,
        coalesce(users, '{}')));
END
$$;
