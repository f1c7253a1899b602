"""The schema contract: the tables the ORM created are the ones the engine reads and writes.

:mod:`mqtt_engine.schema` declares every column the engine uses; a field renamed or retyped on
either side fails here instead of in production.
"""

import re

from mqtt_engine import schema

from odoo.tests import TransactionCase, tagged


@tagged("post_install", "-at_install")
class TestSchemaContract(TransactionCase):
    def test_tables_and_columns(self):
        for table in schema.TABLES:
            self.env.cr.execute(
                """
                SELECT column_name, data_type
                  FROM information_schema.columns
                 WHERE table_schema = current_schema() AND table_name = %s
                """,
                (table.name,),
            )
            actual = dict(self.env.cr.fetchall())
            self.assertTrue(actual, f"table {table.name} does not exist")
            for column, kind in table.columns.items():
                with self.subTest(table=table.name, column=column):
                    self.assertIn(column, actual, f"{table.name}.{column} is missing")
                    self.assertEqual(
                        actual[column],
                        schema.PG_TYPES[kind],
                        f"{table.name}.{column} is {actual[column]}, the engine expects {kind}",
                    )

    def test_unique_constraints(self):
        declared = [(table, columns) for table in schema.TABLES for columns in table.unique]
        self.assertTrue(declared)
        for table, columns in declared:
            name = schema.unique_constraint_name(table, columns)
            with self.subTest(constraint=name):
                self.env.cr.execute(
                    """
                    SELECT c.contype, array_agg(a.attname::text ORDER BY k.ord)
                      FROM pg_constraint c
                      JOIN pg_class t ON t.oid = c.conrelid
                      JOIN LATERAL unnest(c.conkey) WITH ORDINALITY AS k(attnum, ord) ON TRUE
                      JOIN pg_attribute a ON a.attrelid = t.oid AND a.attnum = k.attnum
                     WHERE c.conname = %s AND t.relname = %s
                     GROUP BY c.contype
                    """,
                    (name, table.name),
                )
                row = self.env.cr.fetchone()
                self.assertIsNotNone(row, f"unique constraint {name} is missing")
                self.assertEqual(row, ("u", list(columns)))

    def test_models_own_the_tables(self):
        tables = {model._table for model in self.env.registry.values() if not model._abstract}
        for table in schema.TABLES:
            self.assertIn(table.name, tables, f"no model owns {table.name}")

    def test_partial_indexes(self):
        """The engine's work-queue indexes exist, partial as declared (outbox: queued only)."""
        for table in schema.TABLES:
            for name, columns, where in table.partial_indexes:
                self.env.cr.execute(
                    "SELECT indexdef FROM pg_indexes WHERE tablename = %s AND indexname = %s",
                    (table.name, f"{table.name}_{name}_idx"),
                )
                row = self.env.cr.fetchone()
                with self.subTest(index=name):
                    self.assertTrue(row, f"index {name} of {table.name} is missing")
                    self.assertIn(f"({', '.join(columns)})", row[0])
                    self.assertIn("WHERE", row[0])
                    for literal in re.findall(r"'[^']*'", where):  # PostgreSQL rewrites the rest
                        self.assertIn(literal, row[0])
