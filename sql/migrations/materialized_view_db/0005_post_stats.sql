-- post_stats: per author, how many posts and when the first and the last was written.
-- A derived view (see 0004_derived_views.sql): equal at every commit to post_stats_definition.
-- Authors deleted upstream keep their row: their posts stay.

CREATE TABLE post_stats (
    author_id     bigint      PRIMARY KEY,
    post_count    bigint      NOT NULL,
    first_post_at timestamptz NOT NULL,
    last_post_at  timestamptz NOT NULL
);

CREATE VIEW post_stats_definition AS
SELECT author_id,
       count(*)        AS post_count,
       min(created_at) AS first_post_at,
       max(created_at) AS last_post_at
  FROM posts
 GROUP BY author_id;

-- One author's count, first and last post from the index alone.
CREATE INDEX posts_author_id_created_at_idx ON posts (author_id, created_at);

-- Recomputes the rows of these authors (NULL: every author) from their posts.
CREATE FUNCTION post_stats_refresh(authors bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
DECLARE
    keys bigint[];
BEGIN
    keys := CASE WHEN authors IS NULL
                 THEN ARRAY(SELECT author_id FROM post_stats UNION SELECT author_id FROM posts
                            ORDER BY 1)
                 ELSE ARRAY(SELECT DISTINCT a FROM unnest(authors) AS a ORDER BY a) END;
    IF cardinality(keys) = 0 THEN
        RETURN;
    END IF;
    -- Lock every author's row in key order, creating the missing ones: a concurrent writer of the
    -- same author waits here until this transaction ends.
    INSERT INTO post_stats AS s (author_id, post_count, first_post_at, last_post_at)
    SELECT k, 0, '-infinity', '-infinity' FROM unnest(keys) AS k ORDER BY k
        ON CONFLICT (author_id) DO UPDATE SET post_count = s.post_count;
    -- Statements started after the locks: they see every post committed by then.
    DELETE FROM post_stats s
     WHERE s.author_id = ANY(keys)
       AND NOT EXISTS (SELECT 1 FROM posts p WHERE p.author_id = s.author_id);
    UPDATE post_stats s
       SET post_count = c.post_count, first_post_at = c.first_post_at,
           last_post_at = c.last_post_at
      FROM (SELECT author_id, count(*) AS post_count, min(created_at) AS first_post_at,
                   max(created_at) AS last_post_at
              FROM posts WHERE author_id = ANY(keys) GROUP BY author_id) AS c
     WHERE s.author_id = c.author_id;
END
$$;

INSERT INTO derived_views (name, key, position) VALUES ('post_stats', 'author_id', 1);
INSERT INTO post_stats SELECT * FROM post_stats_definition;

CREATE OR REPLACE FUNCTION derived_views_refresh(authors bigint[], users bigint[]) RETURNS void
LANGUAGE plpgsql AS $$
BEGIN
    PERFORM post_stats_refresh(authors);
END
$$;
