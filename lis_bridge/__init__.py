"""The LIS database: models, migrations, sample lifecycle, results, reports, outbox.

Plain functions over a SQLAlchemy ``Session``; nothing here knows analyzers or wire formats.
"""
