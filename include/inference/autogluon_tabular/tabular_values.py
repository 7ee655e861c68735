"""The values of a tabular model's requests: each feature's converter to its training dtype, and the frame.

A sibling of ``inference.py`` in ``code/`` (on ``sys.path`` there, as in the SageMaker containers):
:func:`converter` is built once per feature when a model loads; :func:`request_frame` turns parsed rows into
the DataFrame the predictor takes (training order and dtypes, plus the id column when sent). Values
that do not fit raise ``ValueError`` naming the feature and the row. Nothing here imports Airflow or
Conveyor.
"""

import math
from typing import Any

import numpy as np
import pandas as pd

# Strings read as a missing number (pandas' default NA markers, as training read CSV files).
NA_STRINGS = frozenset(
    "|#N/A|#N/A N/A|#NA|-1.#IND|-1.#QNAN|-NaN|-nan|1.#IND|1.#QNAN|<NA>|N/A|NA|NULL|NaN|None|n/a|nan|null".split("|")
)
TRUE_STRINGS = frozenset({"true", "t", "yes", "y", "1"})
FALSE_STRINGS = frozenset({"false", "f", "no", "n", "0"})


def request_frame(rows: list[tuple[int, list[Any]]], columns: list[str], model: Any, media: str) -> pd.DataFrame:
    """Build the frame of features (training order and dtypes) and the id column when sent.

    Values are converted column by column in plain Python by the model's converters, into numpy
    columns (cheaper than pandas Series for the single-row requests of an endpoint, linear for batches).

    :param rows: the rows, each with its 1-based row number.
    :param columns: the column of each value.
    :param model: the model (its ``features``, ``converters`` and ``id_column``).
    :param media: the content type, for messages.
    """
    numbers = [number for number, _ in rows]
    position = {name: i for i, name in enumerate(columns)}
    out: dict[str, Any] = {}
    for name in model.features:
        i = position[name]
        out[name] = model.converters[name]([values[i] for _, values in rows], numbers, media)
    if model.id_column and model.id_column in position:
        i = position[model.id_column]
        out[model.id_column] = _objects([values[i] for _, values in rows])
    return pd.DataFrame(out, copy=False)  # numpy columns: no per-column Series to align


def converter(dtype: str, name: str) -> Any:
    """The converter of one feature: ``(values, row numbers, media) -> column`` in its training dtype.

    Numbers are parsed from strings; the empty string and ``null`` are missing everywhere, and
    pandas' NA markers (``NA``, ``NaN``, ``null``, ...) are missing in numeric, boolean and date
    columns (as when training read CSV files). Integer features stay integers when every value is
    whole and present, else become float64, which the predictor accepts. Values that do not fit
    raise ``ValueError`` naming the feature and the row.

    :param dtype: the training dtype from ``metadata.json``.
    :param name: the feature.
    """
    try:
        target = pd.api.types.pandas_dtype(dtype)
    except TypeError:
        target = np.dtype(object)
    if pd.api.types.is_bool_dtype(target):

        def booleans(values: list[Any], numbers: list[int], media: str) -> Any:
            parsed = [_convert(v, _to_bool, numbers[i], name, "true or false", media) for i, v in enumerate(values)]
            return np.array(parsed, dtype=bool) if None not in parsed else pd.array(parsed, dtype="boolean")

        return booleans
    if pd.api.types.is_numeric_dtype(target):
        integer = pd.api.types.is_integer_dtype(target)
        extension = isinstance(target, pd.api.extensions.ExtensionDtype)

        def numbers_of(values: list[Any], numbers: list[int], media: str) -> Any:
            parsed = [_convert(v, _to_float, numbers[i], name, "a number", media) for i, v in enumerate(values)]
            array = np.array([math.nan if v is None else v for v in parsed], dtype="float64")
            if integer:
                present = array[~np.isnan(array)]
                if np.all(present == np.floor(present)) and (len(present) == len(array) or extension):
                    return pd.array(array).astype(target) if extension else array.astype(target)
            return array

        return numbers_of
    if pd.api.types.is_datetime64_any_dtype(target):

        def dates(values: list[Any], numbers: list[int], media: str) -> Any:
            parsed = [_convert(v, pd.Timestamp, numbers[i], name, "a date/time", media) for i, v in enumerate(values)]
            return pd.to_datetime(pd.Series(parsed, dtype=object))

        return dates

    def texts(values: list[Any], numbers: list[int], media: str) -> Any:
        for i, value in enumerate(values):
            if isinstance(value, (dict, list)):
                raise ValueError(f"{media}: feature '{name}' takes a single value; row {numbers[i]} has {value!r}")
        return _objects([_to_text(v) for v in values])

    return texts


def _objects(values: list[Any]) -> np.ndarray:
    """A 1-D object array of the values (never split into more dimensions); ``values``: the column."""
    array = np.empty(len(values), dtype=object)
    array[:] = values
    return array


def _convert(value: Any, parse: Any, number: int, name: str, expected: str, media: str) -> Any:
    """Parse one value of a numeric, boolean or date column; None when missing.

    :param value: the value as sent.
    :param parse: the parser, raising ``ValueError`` or ``TypeError`` on a bad value.
    :param number: its row number, for messages.
    :param name: the feature, for messages.
    :param expected: what the feature takes, e.g. ``a number``.
    :param media: the content type, for messages.
    """
    if value is None or (isinstance(value, str) and value.strip() in NA_STRINGS):
        return None
    try:
        return parse(value)
    except (ValueError, TypeError, OverflowError):
        raise ValueError(f"{media}: feature '{name}' takes {expected}; row {number} has {value!r}") from None


def _to_float(value: Any) -> float:
    """A number from a JSON number or a string; booleans and containers refused.

    :param value: one request value (not missing).
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise TypeError(value)
    return float(value)


def _to_bool(value: Any) -> bool:
    """A boolean from JSON true/false, 0/1, or a string such as true/false, yes/no, 1/0.

    :param value: one request value (not missing).
    """
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_STRINGS | FALSE_STRINGS:
        return value.strip().lower() in TRUE_STRINGS
    raise ValueError(value)


def _to_text(value: Any) -> Any:
    """A categorical value as text; None, NaN and the empty string are missing.

    :param value: one request value.
    """
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, str):
        return value if value != "" else None
    if isinstance(value, float) and value.is_integer() and abs(value) < 2**53:
        return str(int(value))
    return str(value)
