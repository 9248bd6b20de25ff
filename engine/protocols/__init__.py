"""Sans-I/O protocol cores. Nothing here imports Twisted, SQLAlchemy or the database."""
