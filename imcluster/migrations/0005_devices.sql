-- imcluster 0005: push targets of offline push (HTTP-API.md: PUT/DELETE /v1/users/{id}/devices/{deviceId}).
-- One row per (user, device); twistd impush reads a whole AMQP message's users in one
-- statement on the primary key, and deletes a device its push provider answered 404/410 for.
-- (0004 belongs to another change of the same release.)

CREATE TABLE device (
    user_id     text NOT NULL,
    device_id   text NOT NULL,
    platform    text NOT NULL CHECK (platform IN ('fcm', 'apns', 'webpush')),
    token       text NOT NULL,
    updated_at  timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (user_id, device_id)
);
