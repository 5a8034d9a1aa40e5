-- The user service's table: the only thing user-api writes, and what cdc-reader captures.
CREATE TABLE users (
    id          bigserial   PRIMARY KEY,
    name        text        NOT NULL CHECK (char_length(name) BETWEEN 1 AND 100),
    email       text        NOT NULL CHECK (char_length(email) BETWEEN 3 AND 254),
    department  text        NOT NULL CHECK (char_length(department) BETWEEN 1 AND 100),
    status      text        NOT NULL DEFAULT 'ACTIVE' CHECK (status IN ('ACTIVE', 'INACTIVE')),
    created_at  timestamptz NOT NULL DEFAULT now(),
    updated_at  timestamptz NOT NULL DEFAULT now()
);

-- Emails are unique regardless of case: 'Ann@x.org' and 'ann@X.org' are the same mailbox.
CREATE UNIQUE INDEX users_email_lower_key ON users (lower(email));
