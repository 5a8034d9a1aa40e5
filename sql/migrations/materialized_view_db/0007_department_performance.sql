-- department_performance: per department of user_view, its users, its active users, the posts of
-- the users in it now, posts per active user and its last post.
-- A derived view (see 0004_derived_views.sql): equal at every commit to
-- department_performance_definition. Built on user_activity: each change of a user's row there
-- moves the user's counts out of their old department and into the new one.

CREATE TABLE department_performance (
    department            text        PRIMARY KEY,
    user_count            bigint      NOT NULL,
    active_users          bigint      NOT NULL,
    post_count            bigint      NOT NULL,
    posts_per_active_user numeric
        GENERATED ALWAYS AS (CASE WHEN active_users > 0
                                  THEN post_count::numeric / active_users END) STORED,
    last_post_at          timestamptz
);

CREATE VIEW department_performance_definition AS
SELECT u.department,
       count(DISTINCT u.user_id)                                    AS user_count,
       count(DISTINCT u.user_id) FILTER (WHERE u.status = 'ACTIVE') AS active_users,
       count(p.id)                                                  AS post_count,
       CASE WHEN count(DISTINCT u.user_id) FILTER (WHERE u.status = 'ACTIVE') > 0
            THEN count(p.id)::numeric
                 / count(DISTINCT u.user_id) FILTER (WHERE u.status = 'ACTIVE') END
                                                                    AS posts_per_active_user,
       max(p.created_at)                                            AS last_post_at
  FROM user_view u
  LEFT JOIN posts p ON p.author_id = u.user_id
 GROUP BY u.department;

-- Applies what user_activity_refresh changed: counts move by deltas; a department that lost a
-- user's last post finds its new last post from the index.
CREATE FUNCTION department_performance_apply(changes user_activity_change[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    touched text[];
    recheck text[];
BEGIN
    IF coalesce(cardinality(changes), 0) = 0 THEN
        RETURN;
    END IF;
    WITH moves AS (
        SELECT m.*
          FROM unnest(changes) AS c,
               LATERAL (VALUES (c.old_department, -1, -(c.old_status = 'ACTIVE')::int,
                                -c.old_post_count, NULL::timestamptz, c.old_last_post_at),
                               (c.new_department, 1, (c.new_status = 'ACTIVE')::int,
                                c.new_post_count, c.new_last_post_at, NULL))
                   AS m(department, users, active, posts, added_last, removed_last)
         WHERE m.department IS NOT NULL
    ), delta AS (
        SELECT department, sum(users) AS users, sum(active) AS active, sum(posts) AS posts,
               max(added_last) AS added_last, max(removed_last) AS removed_last
          FROM moves GROUP BY department
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

INSERT INTO derived_views (name, key, position)
VALUES ('department_performance', 'department', 3);
INSERT INTO department_performance (department, user_count, active_users, post_count,
                                    last_post_at)
SELECT department, user_count, active_users, post_count, last_post_at
  FROM department_performance_definition;

CREATE OR REPLACE FUNCTION derived_views_refresh(authors bigint[], users bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM post_stats_refresh(authors);
    PERFORM department_performance_apply(user_activity_refresh(
        CASE WHEN authors IS NULL OR users IS NULL THEN NULL ELSE authors || users END));
END
$$;
