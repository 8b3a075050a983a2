"""A cluster rehearsal on one machine: multi-node Ray, moto S3, MLflow server on PostgreSQL.

`infra.rehearsal.cluster` holds it (module and CLI); docs/cluster.md ("Rehearsal") describes its use.
"""
