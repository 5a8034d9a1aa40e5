-- What the projector needs besides the views themselves.

-- A department's count may pass through zero inside the projector's transaction (its row is then
-- deleted in that same transaction, so no committed state ever shows a zero count).
ALTER TABLE department_stats DROP CONSTRAINT department_stats_user_count_check;
ALTER TABLE department_stats ADD CONSTRAINT department_stats_user_count_check CHECK (user_count >= 0);

-- The position of the last delete of each user no longer in user_view, so that an older event
-- delivered again (a replay, a re-published change) cannot bring the row back.
CREATE TABLE user_view_deletions (
    user_id    bigint      PRIMARY KEY,
    source_lsn pg_lsn      NOT NULL,
    source_seq bigint      NOT NULL,
    deleted_at timestamptz NOT NULL DEFAULT now()
);

-- The position of the last TRUNCATE of a source table: every event at or below it is ignored.
CREATE TABLE projector_truncations (
    source_table text        PRIMARY KEY,
    source_lsn   pg_lsn      NOT NULL,
    source_seq   bigint      NOT NULL,
    applied_at   timestamptz NOT NULL DEFAULT now()
);

-- Posts by author, newest first, and the department lookups of post-api.
CREATE INDEX user_view_department_user_id_idx ON user_view (department, user_id);
CREATE INDEX posts_author_id_id_idx ON posts (author_id, id);
DROP INDEX posts_author_id_idx;
DROP INDEX user_view_department_idx;
