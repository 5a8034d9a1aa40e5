-- user_activity: per user of user_view, their profile, their posts and when they last did either.
-- A derived view (see 0004_derived_views.sql): equal at every commit to user_activity_definition.
-- Built on post_stats (a user's post_count and last_post_at are their author row there).

CREATE TABLE user_activity (
    user_id                bigint      PRIMARY KEY,
    name                   text        NOT NULL,
    department             text        NOT NULL,
    status                 text        NOT NULL,
    post_count             bigint      NOT NULL,
    last_post_at           timestamptz,
    last_profile_change_at timestamptz NOT NULL,
    last_activity_at       timestamptz
        GENERATED ALWAYS AS (greatest(last_post_at, last_profile_change_at)) STORED
);
-- A department's last post (department_performance) from the index alone; users without posts
-- (most, often) cost it nothing.
CREATE INDEX user_activity_department_last_post_at_idx ON user_activity (department, last_post_at)
    WHERE last_post_at IS NOT NULL;

CREATE VIEW user_activity_definition AS
SELECT u.user_id,
       u.name,
       u.department,
       u.status,
       count(p.id)                           AS post_count,
       max(p.created_at)                     AS last_post_at,
       u.updated_at                          AS last_profile_change_at,
       greatest(max(p.created_at), u.updated_at) AS last_activity_at
  FROM user_view u
  LEFT JOIN posts p ON p.author_id = u.user_id
 GROUP BY u.user_id;

-- What a refresh changed in one row, for the views built on this one (old_* NULL: the row is new;
-- new_* NULL: it is gone).
CREATE TYPE user_activity_change AS (
    user_id          bigint,
    old_department   text,
    old_status       text,
    old_post_count   bigint,
    old_last_post_at timestamptz,
    new_department   text,
    new_status       text,
    new_post_count   bigint,
    new_last_post_at timestamptz
);

-- Recomputes the rows of these users (NULL: every user) from user_view and post_stats; returns
-- the rows it changed.
CREATE FUNCTION user_activity_refresh(users bigint[]) RETURNS user_activity_change[]
LANGUAGE plpgsql AS $$
DECLARE
    keys bigint[];
    before user_activity[];
    created user_activity_change[];
    changed user_activity_change[];
BEGIN
    keys := CASE WHEN users IS NULL
                 THEN ARRAY(SELECT user_id FROM user_activity UNION SELECT user_id FROM user_view
                            ORDER BY 1)
                 ELSE ARRAY(SELECT DISTINCT u FROM unnest(users) AS u ORDER BY u) END;
    IF cardinality(keys) = 0 THEN
        RETURN '{}';
    END IF;
    -- What is read must hold still until commit: the users' post_stats rows (locked after those
    -- post_stats_refresh wrote, which this transaction holds already)...
    PERFORM 1 FROM post_stats WHERE author_id = ANY(keys) ORDER BY author_id FOR SHARE;
    -- ...and their rows here, kept as they were, in key order.
    before := ARRAY(SELECT a FROM user_activity a WHERE a.user_id = ANY(keys)
                    ORDER BY a.user_id FOR UPDATE);
    -- Rows of users new here, in one statement. (Statements from here on started after the
    -- locks: they see every row committed by then.) When another transaction made one of them
    -- meanwhile, the insert fails as a whole and is undone; the rows made meanwhile are locked and
    -- kept as they were, like the others above, and the insert is tried again without them.
    LOOP
        BEGIN
            WITH new AS (
                INSERT INTO user_activity (user_id, name, department, status, post_count,
                                           last_post_at, last_profile_change_at)
                SELECT u.user_id, u.name, u.department, u.status, coalesce(s.post_count, 0),
                       s.last_post_at, u.updated_at
                  FROM user_view u LEFT JOIN post_stats s ON s.author_id = u.user_id
                 WHERE u.user_id = ANY(keys)
                   AND u.user_id NOT IN (SELECT b.user_id FROM unnest(before) AS b)
                 ORDER BY u.user_id
                RETURNING user_id, department, status, post_count, last_post_at
            )
            SELECT coalesce(array_agg(ROW(n.user_id, NULL, NULL, NULL, NULL, n.department,
                                          n.status, n.post_count,
                                          n.last_post_at)::user_activity_change), '{}')
              INTO created
              FROM new AS n;
            EXIT;
        EXCEPTION WHEN unique_violation THEN
            before := before || ARRAY(
                SELECT a FROM user_activity a
                 WHERE a.user_id = ANY(keys)
                   AND a.user_id NOT IN (SELECT b.user_id FROM unnest(before) AS b)
                 ORDER BY a.user_id FOR UPDATE);
        END;
    END LOOP;
    IF cardinality(before) = 0 THEN
        RETURN created;
    END IF;
    WITH old AS (
        SELECT * FROM unnest(before)
    ), source AS MATERIALIZED (
        SELECT o.user_id, u.user_id IS NOT NULL AS present, u.name, u.department, u.status,
               coalesce(s.post_count, 0) AS post_count, s.last_post_at, u.updated_at
          FROM old o
          LEFT JOIN user_view u ON u.user_id = o.user_id
          LEFT JOIN post_stats s ON s.author_id = o.user_id
    ), gone AS (
        DELETE FROM user_activity a
         USING source s
         WHERE a.user_id = s.user_id AND NOT s.present
        RETURNING a.user_id
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
        RETURNING a.user_id, a.department, a.status, a.post_count, a.last_post_at
    )
    SELECT coalesce(array_agg(ROW(c.user_id, o.department, o.status, o.post_count, o.last_post_at,
                                  w.department, w.status, w.post_count,
                                  w.last_post_at)::user_activity_change), '{}')
      INTO changed
      FROM (SELECT user_id FROM gone UNION ALL SELECT user_id FROM written) AS c
      JOIN old AS o ON o.user_id = c.user_id
      LEFT JOIN written AS w ON w.user_id = c.user_id;
    RETURN created || changed;
END
$$;

INSERT INTO derived_views (name, key, position) VALUES ('user_activity', 'user_id', 2);
INSERT INTO user_activity (user_id, name, department, status, post_count, last_post_at,
                           last_profile_change_at)
SELECT user_id, name, department, status, post_count, last_post_at, last_profile_change_at
  FROM user_activity_definition;

-- A user's posts count in user_activity: a changed author is a changed user.
CREATE OR REPLACE FUNCTION derived_views_refresh(authors bigint[], users bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM post_stats_refresh(authors);
    PERFORM user_activity_refresh(
        CASE WHEN authors IS NULL OR users IS NULL THEN NULL ELSE authors || users END);
END
$$;
