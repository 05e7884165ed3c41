DROP TRIGGER entry_events_append_only ON entry_events;
DROP FUNCTION entry_events_append_only();
DROP TABLE entry_events;
DROP TABLE fills;
DROP TABLE entries;
DROP SEQUENCE entry_ids;
