"""Alembic environment. ReviewStore passes an open connection in `config.attributes["connection"]`,
so migrations run from an installed package without an alembic.ini."""
from alembic import context

from immunizer.review.models import Base

connection = context.config.attributes["connection"]
context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True)
with context.begin_transaction():
    context.run_migrations()
