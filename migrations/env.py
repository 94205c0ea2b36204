import logging
import re
from logging.config import fileConfig

from flask import current_app

from alembic import context
from sqlalchemy import String

from bucket.models import InternalChar

# this is the Alembic Config object, which provides
# access to the values within the .ini file in use.
config = context.config

# Interpret the config file for Python logging.
# This line sets up loggers basically.
fileConfig(config.config_file_name, disable_existing_loggers=False)
logger = logging.getLogger("alembic.env")


def get_engine():
    return current_app.extensions["migrate"].db.engine


def get_engine_url():
    try:
        return get_engine().url.render_as_string(hide_password=False).replace("%", "%%")
    except AttributeError:
        return str(get_engine().url).replace("%", "%%")


# add your model's MetaData object here
# for 'autogenerate' support
# from myapp import mymodel
# target_metadata = mymodel.Base.metadata
config.set_main_option("sqlalchemy.url", get_engine_url())
target_db = current_app.extensions["migrate"].db

# other values from the config, defined by the needs of env.py,
# can be acquired:
# my_important_option = config.get_main_option("my_important_option")
# ... etc.


def get_metadata():
    if hasattr(target_db, "metadatas"):
        return target_db.metadatas[None]
    return target_db.metadata


# PostgreSQL's layout of packets differs from the models on purpose (migration 0012): its
# partitions are tables of their own, its unique keys live in packet_keys (PostgreSQL only),
# and deliveries has no foreign key to it. Deliveries are partitioned by state (migration
# 0014): the queue index lives on the hot partition only. packet_keys is partitioned by client
# day, beside packet_idempotency_keys (0015). ix_packets_seq is a unique index of each
# partition of packets (0017); ix_packets_user is built on the user id's key (0028). The
# dictionary of raw_signals' key sets is PostgreSQL's only, and SQLite's raw_signals stays NOT
# NULL, its table not rebuilt (0020: every SQLite row fills it).
# The drift check compares the rest.
PARTITION = re.compile(
    r"^(packets_(legacy|default|p\d{8})|packet_keys_(legacy|default|p\d{8})"
    r"|deliveries_(hot|processed(_(legacy|default|p\d{8}))?))$"
)
POSTGRES_PARTITION_INDEXES = {"ix_deliveries_queue", "ix_packets_seq"}
# Built on the user id's key on PostgreSQL (0028), on the id on SQLite, whose definition the
# model declares (tests/test_migrations.py checks PostgreSQL's).
POSTGRES_EXPRESSION_INDEXES = {"ix_packets_user"}
POSTGRES_ONLY_TABLES = {"packet_keys", "packet_idempotency_keys", "signal_key_sets"}
SQLITE_ONLY = {"uq_packets_dedup_key", "uq_packets_idempotency_key"}


def include_object(obj, name, type_, reflected, compare_to):
    postgres = get_engine().dialect.name == "postgresql"
    if type_ == "table":
        if PARTITION.match(name or ""):
            return False
        return postgres or name not in POSTGRES_ONLY_TABLES
    if not postgres and type_ == "column" and name == "raw_signals":
        return False
    if postgres and type_ == "index" and name in POSTGRES_PARTITION_INDEXES:
        return False
    if postgres and type_ == "index" and name in POSTGRES_EXPRESSION_INDEXES:
        return False
    if postgres and type_ in ("index", "unique_constraint") and name in SQLITE_ONLY:
        return False
    if postgres and type_ == "foreign_key_constraint" and obj.table.name == "deliveries":
        return False
    return True


def compare_type(context, inspected_column, metadata_column, inspected_type, metadata_type):
    """PostgreSQL reflects a ``"char"`` column (``models.InternalChar``) as a String without a
    length: that is the same type; anything else as Alembic compares it."""
    if isinstance(metadata_type.dialect_impl(context.dialect), InternalChar):
        return not (type(inspected_type) is String and inspected_type.length is None)
    return None


def run_migrations_offline():
    """Run migrations in 'offline' mode.

    This configures the context with just a URL
    and not an Engine, though an Engine is acceptable
    here as well.  By skipping the Engine creation
    we don't even need a DBAPI to be available.

    Calls to context.execute() here emit the given string to the
    script output.

    """
    url = config.get_main_option("sqlalchemy.url")
    context.configure(url=url, target_metadata=get_metadata(), literal_binds=True)

    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online():
    """Run migrations in 'online' mode.

    In this scenario we need to create an Engine
    and associate a connection with the context.

    """

    # this callback is used to prevent an auto-migration from being generated
    # when there are no changes to the schema
    # reference: http://alembic.zzzcomputing.com/en/latest/cookbook.html
    def process_revision_directives(context, revision, directives):
        if getattr(config.cmd_opts, "autogenerate", False):
            script = directives[0]
            if script.upgrade_ops.is_empty():
                directives[:] = []
                logger.info("No changes in schema detected.")

    conf_args = current_app.extensions["migrate"].configure_args
    if conf_args.get("process_revision_directives") is None:
        conf_args["process_revision_directives"] = process_revision_directives

    connectable = get_engine()

    with connectable.connect() as connection:
        context.configure(
            connection=connection,
            target_metadata=get_metadata(),
            include_object=include_object,
            # Flask-Migrate asks for type comparison (True): with the "char" rule above.
            compare_type=compare_type if conf_args.pop("compare_type", True) else False,
            **conf_args,
        )

        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
