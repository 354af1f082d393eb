-- One database per NeuroWeaver service (DESIGN §4: each service owns its own database).
-- Run once by the postgres image on an empty data volume (/docker-entrypoint-initdb.d), as the
-- POSTGRES_USER (`neuroweaver`), which then owns them. The services create their schemas
-- themselves: Alembic migrations run at start, before health turns SERVING.
CREATE DATABASE registry;
CREATE DATABASE trainer;
CREATE DATABASE deployer;
CREATE DATABASE experiments;
