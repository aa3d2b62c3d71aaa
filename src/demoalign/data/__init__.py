"""The data layer: readers (file kinds), hub (hub ids and dataset repository folders, as
`datasets.load_dataset` names them), formats (record shapes), examples (demonstrations),
preferences (pairs), tasks (built-in tasks) and sources (data option or `task:NAME[:SEED]`)."""

from .errors import DataError
from .examples import DataReport, inspect_data, load_examples, load_prompts
from .formats import RECORD_FORMATS, Example, Preference, parse_columns
from .hub import SPLIT_RULE, DataRef
from .preferences import load_preference_pairs, read_preference_pairs
from .readers import FILE_FORMATS

__all__ = [
    "FILE_FORMATS",
    "RECORD_FORMATS",
    "SPLIT_RULE",
    "DataError",
    "DataRef",
    "DataReport",
    "Example",
    "Preference",
    "inspect_data",
    "load_examples",
    "load_preference_pairs",
    "load_prompts",
    "parse_columns",
    "read_preference_pairs",
]
