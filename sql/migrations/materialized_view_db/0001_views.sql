-- The post service's database: views fed by the projector, and the posts it owns.

-- One row per user, as of the change event at (source_lsn, source_seq).
-- source_lsn is the commit LSN of the source transaction and source_seq the change's position
-- within it; the projector ignores any event at or below the position a row already reflects.
CREATE TABLE user_view (
    user_id      bigint      PRIMARY KEY,
    name         text        NOT NULL,
    email        text        NOT NULL,
    department   text        NOT NULL,
    status       text        NOT NULL,
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    source_lsn   pg_lsn      NOT NULL,
    source_seq   bigint      NOT NULL,
    projected_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX user_view_department_idx ON user_view (department);

-- Maintained incrementally in the same transaction as user_view; always equal to
-- SELECT department, count(*), ... FROM user_view GROUP BY department.
CREATE TABLE department_stats (
    department     text        PRIMARY KEY,
    user_count     bigint      NOT NULL CHECK (user_count > 0),
    active_users   bigint      NOT NULL CHECK (active_users >= 0),
    inactive_users bigint      NOT NULL CHECK (inactive_users >= 0),
    last_updated   timestamptz NOT NULL DEFAULT now(),
    CHECK (active_users + inactive_users = user_count)
);

-- Kafka positions the views reflect, written in the same transaction as the view rows.
-- next_offset is the offset of the next record to apply.
CREATE TABLE projector_offsets (
    consumer_group text        NOT NULL,
    topic          text        NOT NULL,
    partition      integer     NOT NULL CHECK (partition >= 0),
    next_offset    bigint      NOT NULL CHECK (next_offset >= 0),
    source_lsn     pg_lsn,
    updated_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Owned by the post service. No foreign key to user_view: an author may be deleted upstream,
-- and the post stays with null author fields.
CREATE TABLE posts (
    id         bigserial   PRIMARY KEY,
    title      text        NOT NULL,
    content    text        NOT NULL,
    author_id  bigint      NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now(),
    updated_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX posts_author_id_idx ON posts (author_id);
