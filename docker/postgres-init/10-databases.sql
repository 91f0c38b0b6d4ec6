-- Runs once, when the PostgreSQL volume is first initialised (POSTGRES_DB, the Optuna database, exists already).
-- Optuna and MLflow each keep their schema version in a table named alembic_version, so each gets its own
-- database; MLflow's basic-auth users live in a third.
CREATE DATABASE mlflow;
CREATE DATABASE mlflow_auth;
