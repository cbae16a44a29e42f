"""The catalog views SQLAlchemy's inspector reads on SQL Server (get_columns,
get_pk_constraint, get_indexes, get_unique_constraints, get_foreign_keys), as temporary
SQLite views over sqlite_master and the pragma table functions. object_id is the
sqlite_master rowid, as in sys.objects; the primary key is index 1, the other indexes
follow in SQLite's order.
"""
from __future__ import annotations

import re

# SQL Server's type ids (sys.types.system_type_id = user_type_id for the built-in ones)
TYPE_IDS = {"int": 56, "bigint": 127, "smallint": 52, "tinyint": 48, "bit": 104,
            "float": 62, "real": 59, "decimal": 106, "numeric": 108, "money": 60,
            "smallmoney": 122, "nvarchar": 231, "varchar": 167, "nchar": 239, "char": 175,
            "ntext": 99, "text": 35, "varbinary": 165, "binary": 173, "date": 40,
            "datetime": 61, "datetime2": 42, "datetimeoffset": 43, "time": 41,
            "smalldatetime": 58, "uniqueidentifier": 36}
_TYPE = re.compile(r"^\s*(\w+)\s*(?:\(\s*(\d+)\s*(?:,\s*(\d+)\s*)?\))?")
_PRECISIONS = {"int": 10, "bigint": 19, "smallint": 5, "tinyint": 3, "bit": 1, "float": 53,
               "real": 24, "money": 19, "date": 10, "datetime": 23, "datetime2": 27,
               "datetimeoffset": 34}
_BYTES = {"int": 4, "bigint": 8, "smallint": 2, "tinyint": 1, "bit": 1, "float": 8,
          "real": 4, "money": 8, "date": 3, "datetime": 8, "datetime2": 8,
          "datetimeoffset": 10, "uniqueidentifier": 16, "decimal": 9, "numeric": 9}


def column_type(declared, part: str):
    """One fact about a column's declared type (as translate.py keeps it in SQLite):
    its SQL Server name, type id, max_length (bytes; -1 for MAX), precision or scale."""
    found = _TYPE.match(str(declared or ""))
    name = found.group(1).lower() if found else "sql_variant"
    name = "int" if name == "integer" else name
    length = int(found.group(2)) if found and found.group(2) else None
    scale = int(found.group(3)) if found and found.group(3) else 0
    if part == "name":
        return name
    if part == "id":
        return TYPE_IDS.get(name, 98)
    if part == "max_length":
        if name in ("nvarchar", "nchar"):
            return -1 if length is None and name == "nvarchar" else 2 * (length or 1)
        if name in ("varchar", "char", "varbinary", "binary"):
            return -1 if length is None and name.startswith("var") else (length or 1)
        return _BYTES.get(name, 0)
    if part == "precision":
        if name in ("decimal", "numeric"):
            return length or 18
        return _PRECISIONS.get(name, 0)
    if part == "scale":
        if name in ("decimal", "numeric"):
            return scale
        return 7 if name in ("datetime2", "datetimeoffset") else 3 if name == "datetime" else 0
    return None


# tds_visible: a table another transaction created and has not committed is not seen
_TABLES = ("FROM main.sqlite_master m, pragma_table_info(m.name) c WHERE m.type = 'table' "
           "AND m.name NOT LIKE 'sqlite_%' AND tds_visible(m.name)")
_INDEXES = ("FROM main.sqlite_master m, pragma_index_list(m.name) il WHERE m.type = 'table' "
            "AND m.name NOT LIKE 'sqlite_%' AND tds_visible(m.name) AND il.origin != 'pk'")
_FOREIGN = ("FROM main.sqlite_master m, pragma_foreign_key_list(m.name) f WHERE m.type = 'table' "
            "AND m.name NOT LIKE 'sqlite_%' AND tds_visible(m.name)")

VIEWS = {
    "tds_sys_columns":
        "SELECT m.rowid AS object_id, c.name AS name, c.cid + 1 AS column_id,"
        " tds_column_type(c.type, 'id') AS user_type_id,"
        " tds_column_type(c.type, 'id') AS system_type_id,"
        " CASE WHEN c.\"notnull\" = 1 OR c.pk > 0 THEN 0 ELSE 1 END AS is_nullable,"
        " tds_column_type(c.type, 'max_length') AS max_length,"
        " tds_column_type(c.type, 'precision') AS precision,"
        " tds_column_type(c.type, 'scale') AS scale,"
        " CASE WHEN c.dflt_value IS NULL THEN 0 ELSE m.rowid * 1000 + c.cid + 1 END"
        " AS default_object_id,"
        " CASE WHEN tds_column_type(c.type, 'name') IN ('nvarchar', 'varchar', 'nchar', 'char',"
        " 'ntext', 'text') THEN 'SQL_Latin1_General_CP1_CI_AS' END AS collation_name,"
        " CASE WHEN upper(c.type) = 'INTEGER' AND c.pk = 1 THEN 1 ELSE 0 END AS is_identity,"
        " 0 AS is_computed " + _TABLES,
    "tds_sys_types":
        "SELECT column1 AS name, column2 AS user_type_id, column2 AS system_type_id FROM (VALUES "
        + ", ".join(f"('{name}', {number})" for name, number in TYPE_IDS.items()) + ")",
    "tds_sys_default_constraints":
        "SELECT m.rowid * 1000 + c.cid + 1 AS object_id, m.rowid AS parent_object_id,"
        " c.cid + 1 AS parent_column_id, 'DF_' || m.name || '_' || c.name AS name,"
        " CASE WHEN c.dflt_value GLOB '[0-9]*' OR c.dflt_value GLOB '-[0-9]*'"
        " THEN '((' || c.dflt_value || '))' ELSE '(' || c.dflt_value || ')' END AS definition " + _TABLES + " AND c.dflt_value IS NOT NULL",
    "tds_sys_computed_columns":
        "SELECT NULL AS object_id, NULL AS column_id, NULL AS name, NULL AS definition,"
        " NULL AS is_persisted WHERE 0",
    "tds_sys_identity_columns":
        "SELECT m.rowid AS object_id, c.cid + 1 AS column_id, c.name AS name, 1 AS is_identity,"
        " 1 AS seed_value, 1 AS increment_value " + _TABLES
        + " AND upper(c.type) = 'INTEGER' AND c.pk = 1",
    "tds_sys_extended_properties":
        "SELECT NULL AS class, NULL AS name, NULL AS major_id, NULL AS minor_id, NULL AS value"
        " WHERE 0",
    "tds_sys_indexes":
        "SELECT DISTINCT m.rowid AS object_id, 1 AS index_id, 'PK_' || m.name AS name, 1 AS is_unique,"
        " 1 AS type, 1 AS is_primary_key, 0 AS is_unique_constraint, NULL AS filter_definition,"
        " 0 AS has_filter, m.name AS object_name " + _TABLES + " AND c.pk > 0"
        " UNION ALL SELECT m.rowid, il.seq + 2, il.name, il.\"unique\", 2, 0,"
        " CASE il.origin WHEN 'u' THEN 1 ELSE 0 END, NULL, 0, m.name " + _INDEXES,
    "tds_sys_index_columns":
        "SELECT m.rowid AS object_id, 1 AS index_id, c.cid + 1 AS column_id, c.pk AS key_ordinal,"
        " 0 AS is_included_column, 0 AS is_descending_key " + _TABLES + " AND c.pk > 0"
        " UNION ALL SELECT m.rowid, il.seq + 2, ii.cid + 1, ii.seqno + 1, 0, 0 "
        "FROM main.sqlite_master m, pragma_index_list(m.name) il, pragma_index_info(il.name) ii"
        " WHERE m.type = 'table' AND m.name NOT LIKE 'sqlite_%' AND tds_visible(m.name)"
        " AND il.origin != 'pk'",
    "tds_sys_key_constraints":
        "SELECT DISTINCT 'PK_' || m.name AS name, m.rowid AS parent_object_id, 'PK' AS type,"
        " 1 AS unique_index_id " + _TABLES + " AND c.pk > 0"
        " UNION ALL SELECT il.name, m.rowid, 'UQ', il.seq + 2 " + _INDEXES + " AND il.origin = 'u'",
    "tds_is_key_column_usage":
        "SELECT 'test' AS CONSTRAINT_CATALOG, 'dbo' AS CONSTRAINT_SCHEMA,"
        " 'PK_' || m.name AS CONSTRAINT_NAME, 'test' AS TABLE_CATALOG, 'dbo' AS TABLE_SCHEMA,"
        " m.name AS TABLE_NAME, c.name AS COLUMN_NAME, c.pk AS ORDINAL_POSITION "
        + _TABLES + " AND c.pk > 0"
        " UNION ALL SELECT 'test', 'dbo', 'FK_' || m.name || '_' || f.id, 'test', 'dbo', m.name,"
        " f.\"from\", f.seq + 1 " + _FOREIGN,
    "tds_is_referential_constraints":
        "SELECT DISTINCT 'test' AS CONSTRAINT_CATALOG, 'dbo' AS CONSTRAINT_SCHEMA,"
        " 'FK_' || m.name || '_' || f.id AS CONSTRAINT_NAME, 'test' AS UNIQUE_CONSTRAINT_CATALOG,"
        " 'dbo' AS UNIQUE_CONSTRAINT_SCHEMA, 'PK_' || f.\"table\" AS UNIQUE_CONSTRAINT_NAME,"
        " 'SIMPLE' AS MATCH_OPTION, f.on_update AS UPDATE_RULE, f.on_delete AS DELETE_RULE "
        + _FOREIGN,
}
# (schema, view) as T-SQL names it -> the temporary view standing in for it
NAMES = {("sys", "columns"): "tds_sys_columns", ("sys", "types"): "tds_sys_types",
         ("sys", "default_constraints"): "tds_sys_default_constraints",
         ("sys", "computed_columns"): "tds_sys_computed_columns",
         ("sys", "identity_columns"): "tds_sys_identity_columns",
         ("sys", "extended_properties"): "tds_sys_extended_properties",
         ("sys", "indexes"): "tds_sys_indexes", ("sys", "index_columns"): "tds_sys_index_columns",
         ("sys", "key_constraints"): "tds_sys_key_constraints",
         ("information_schema", "key_column_usage"): "tds_is_key_column_usage",
         ("information_schema", "referential_constraints"): "tds_is_referential_constraints"}
SQL = [f"CREATE TEMP VIEW {name} AS {body}" for name, body in VIEWS.items()]
