"""The sys views SQLAlchemy's inspector joins to reflect a table's columns
(`inspect(connection).get_columns(...)`, as the cluster's run table upgrade reads
it): sys.columns and sys.types from SQLite's own catalog; default constraints,
computed and identity columns and extended properties are empty (the test server
keeps none of them as SQL Server does)."""
from __future__ import annotations

import re

# name -> (system_type_id, max_length, precision, scale) of SQL Server's system types
SYSTEM_TYPES = {
    "image": (34, 16, 0, 0), "text": (35, 16, 0, 0), "uniqueidentifier": (36, 16, 0, 0),
    "date": (40, 3, 10, 0), "time": (41, 5, 16, 7), "datetime2": (42, 8, 27, 7),
    "datetimeoffset": (43, 10, 34, 7), "tinyint": (48, 1, 3, 0), "smallint": (52, 2, 5, 0),
    "int": (56, 4, 10, 0), "smalldatetime": (58, 4, 16, 0), "real": (59, 4, 24, 0),
    "money": (60, 8, 19, 4), "datetime": (61, 8, 23, 3), "float": (62, 8, 53, 0),
    "ntext": (99, 16, 0, 0), "bit": (104, 1, 1, 0), "decimal": (106, 17, 18, 0),
    "numeric": (108, 17, 18, 0), "bigint": (127, 8, 19, 0), "varbinary": (165, 8000, 0, 0),
    "varchar": (167, 8000, 0, 0), "binary": (173, 8000, 0, 0), "char": (175, 8000, 0, 0),
    "nvarchar": (231, 8000, 0, 0), "nchar": (239, 8000, 0, 0),
}
_COLLATED = (35, 99, 167, 175, 231, 239)      # the character types
_DECLARED = re.compile(r"^\s*(\w+)\s*(?:\(\s*(\w+)\s*(?:,\s*(\d+)\s*)?\))?", re.I)

INSPECTOR_VIEWS = [
    "CREATE TEMP VIEW tds_sys_types AS SELECT " + ", ".join(
        f"column{number} AS {name}" for number, name in enumerate((
            "name", "system_type_id", "user_type_id", "schema_id", "max_length", "precision",
            "scale", "collation_name", "is_nullable", "is_user_defined", "is_assembly_type",
            "default_object_id", "rule_object_id", "is_table_type"), 1))
    + " FROM (VALUES " + ", ".join(
        f"('{name}', {type_id}, {type_id}, 4, {length}, {precision}, {scale}, "
        + ("'SQL_Latin1_General_CP1_CI_AS'" if type_id in _COLLATED else "NULL")
        + ", 1, 0, 0, 0, 0, 0)"
        for name, (type_id, length, precision, scale) in SYSTEM_TYPES.items()) + ")",
    "CREATE TEMP VIEW tds_sys_columns AS SELECT m.rowid AS object_id, c.name AS name,"
    " c.cid + 1 AS column_id, tds_type_id(c.type) AS system_type_id,"
    " tds_type_id(c.type) AS user_type_id, tds_max_length(c.type) AS max_length,"
    " tds_precision(c.type) AS precision, tds_scale(c.type) AS scale,"
    " CASE WHEN tds_type_id(c.type) IN (35, 99, 167, 175, 231, 239)"
    " THEN 'SQL_Latin1_General_CP1_CI_AS' END AS collation_name,"
    " CASE WHEN c.\"notnull\" OR c.pk THEN 0 ELSE 1 END AS is_nullable, 0 AS default_object_id"
    " FROM main.sqlite_master m, pragma_table_info(m.name) c WHERE m.type = 'table'"
    " AND m.name NOT LIKE 'sqlite_%' AND tds_visible(m.name)",
    "CREATE TEMP VIEW tds_sys_default_constraints AS SELECT 0 AS object_id,"
    " 0 AS parent_object_id, 0 AS parent_column_id, '' AS definition, '' AS name WHERE 0",
    "CREATE TEMP VIEW tds_sys_computed_columns AS SELECT 0 AS object_id, 0 AS column_id,"
    " '' AS name, '' AS definition, 0 AS is_persisted WHERE 0",
    "CREATE TEMP VIEW tds_sys_identity_columns AS SELECT 0 AS object_id, '' AS name,"
    " 0 AS column_id, 0 AS is_identity, 0 AS seed_value, 0 AS increment_value,"
    " 0 AS last_value, 0 AS is_not_for_replication WHERE 0",
    "CREATE TEMP VIEW tds_sys_extended_properties AS SELECT 0 AS class, '' AS class_desc,"
    " 0 AS major_id, 0 AS minor_id, '' AS name, '' AS value WHERE 0",
]
# (schema, view) -> the temporary view standing for it (translate.CATALOG_VIEWS)
INSPECTOR_CATALOG = {("sys", name): f"tds_sys_{name}" for name in (
    "types", "columns", "default_constraints", "computed_columns", "identity_columns",
    "extended_properties")}


def _declared(declared) -> tuple[str, str | None, str | None]:
    found = _DECLARED.match(str(declared or ""))
    if found is None:
        return "", None, None
    return found.group(1).lower(), found.group(2), found.group(3)


def _type_id(declared) -> int:
    name = _declared(declared)[0]
    if name == "integer":       # an IDENTITY column, kept as SQLite's rowid alias
        name = "int"
    return SYSTEM_TYPES.get(name, SYSTEM_TYPES["nvarchar"])[0]


def _max_length(declared) -> int:
    name, size, _ = _declared(declared)
    if name in ("varchar", "nvarchar", "varbinary", "char", "nchar", "binary"):
        if size is None:
            size = "1" if name in ("char", "nchar", "binary") else "max"
        if size.lower() == "max":
            return -1
        return int(size) * (2 if name.startswith("n") else 1)
    return SYSTEM_TYPES.get("int" if name == "integer" else name, SYSTEM_TYPES["nvarchar"])[1]


def _precision(declared) -> int:
    name, size, _ = _declared(declared)
    if name in ("decimal", "numeric") and size and size.isdigit():
        return int(size)
    return SYSTEM_TYPES.get("int" if name == "integer" else name, (0, 0, 0, 0))[2]


def _scale(declared) -> int:
    name, _, scale = _declared(declared)
    if name in ("decimal", "numeric"):
        return int(scale or 0)
    return SYSTEM_TYPES.get(name, (0, 0, 0, 0))[3]


def register_catalog_functions(db) -> None:
    db.create_function("tds_type_id", 1, _type_id)
    db.create_function("tds_max_length", 1, _max_length)
    db.create_function("tds_precision", 1, _precision)
    db.create_function("tds_scale", 1, _scale)
