-- Every change of an account row bumps its version. A process that keeps an
-- account's keys and settings between fills (to plan a fill without reading
-- them first) writes the fill only if the version is still the one it read:
-- a change made by any process, by any statement, makes that write match
-- nothing, and the fill is read and planned again.
ALTER TABLE accounts ADD COLUMN version BIGINT NOT NULL DEFAULT 0;

CREATE FUNCTION accounts_bump_version() RETURNS trigger
LANGUAGE plpgsql AS $$
BEGIN
    NEW.version := OLD.version + 1;
    RETURN NEW;
END
$$;

CREATE TRIGGER accounts_version BEFORE UPDATE ON accounts
    FOR EACH ROW EXECUTE FUNCTION accounts_bump_version();
