"""Covariates of a normative model: participants.tsv columns as a design matrix.

A covariate-aware normative model (``train --model-type normative --covariates age sex
[--site-column site]``) predicts each voxel's healthy location and scale from the participant's
covariates. :class:`CovariateEncoder` turns the rows of participants.tsv into the design of that
regression, and records everything needed to build the same design when a participant is scored:

- a numeric column (every value parses as a number) with ``df`` 1 enters linearly
  (standardised by the training mean and standard deviation); with ``df`` >= 2 as a B-spline
  basis (scikit-learn's :class:`~sklearn.preprocessing.SplineTransformer`, uniform knots over
  the training range) of ``df`` functions: quadratic for 2, cubic from 3 on, with ``df - 3``
  interior knots;
- a categorical column (anything else) enters as indicators of its levels, the first level in
  sorted order being the reference;
- the site column is not part of the design: sites are the model's random effects (see
  :mod:`bids_anomaly.models.normative.location_scale`), here only listed and indexed.

Every problem with the values (a missing column, a missing value, text in a numeric column, a
level or an age the model has not seen) is a :class:`~bids_anomaly.errors.BadDataError` (exit
65) that names the column and the participant.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import pandas as pd

from bids_anomaly.errors import BadDataError

MISSING = ("", "n/a", "na", "nan", "none", "null")
"""Values read as missing (BIDS writes ``n/a``)."""

AUTO_DF_SUBJECTS = 15
"""With ``df`` "auto", one degree of freedom per this many training subjects (1 to 4): a
linear age effect below 30 controls, a B-spline from 30 on."""


class CovariateError(BadDataError):
    """A covariate column or value that cannot be used (exit 65)."""


def auto_df(n_subjects: int) -> int:
    """Degrees of freedom of a numeric covariate for ``n_subjects`` training subjects."""
    return int(min(4, max(1, n_subjects // AUTO_DF_SUBJECTS)))


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value)) or (
        str(value).strip().lower() in MISSING)


def _number(value: object) -> float | None:
    try:
        number = float(str(value).strip())
    except ValueError:
        return None
    return number if math.isfinite(number) else None


def _who(table: pd.DataFrame, index) -> str:
    if "participant_id" in table.columns:
        return str(table.loc[index, "participant_id"])
    if "label" in table.columns:
        return f"sub-{table.loc[index, 'label']}"
    return f"row {index}"


def _column(table: pd.DataFrame, column: str, what: str) -> pd.Series:
    """The column, refused when absent or with a missing value."""
    if column not in table.columns:
        known = [c for c in table.columns if c != "label"]
        raise CovariateError(f"{what} {column!r} is not a column of participants.tsv "
                             f"(columns: {', '.join(known)})")
    values = table[column]
    missing = [_who(table, i) for i, value in values.items() if _missing(value)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise CovariateError(f"{what} {column!r}: {missing[0]}{more} have no value in "
                             "participants.tsv (n/a); give every selected participant one, or "
                             "leave them out of the selection")
    return values


@dataclass
class CovariateEncoder:
    """The design of a covariate-aware normative model, rebuilt identically when scoring.

    Attributes
    ----------
    covariates : list of str
        The participants.tsv columns, in design order.
    numeric : dict
        Numeric column to ``{"df", "min", "max", "mean", "sd"}`` over the fitted subjects, and
        ``accepted``, the range scored without ``--extrapolate`` (see :meth:`accept`).
    levels : dict
        Categorical column to its levels (sorted; the first is the reference).
    site_column : str or None
        The column naming each participant's site (scanner), if any.
    sites : list of str
        The sites the model knows, in the order of their random effects.
    centers : list of float
        The training mean of each design column after the intercept, subtracted so that the
        intercept is the norm of the average training participant (and nearly uncorrelated
        with the other coefficients).
    """

    covariates: list[str] = field(default_factory=list)
    numeric: dict[str, dict] = field(default_factory=dict)
    levels: dict[str, list[str]] = field(default_factory=dict)
    site_column: str | None = None
    sites: list[str] = field(default_factory=list)
    centers: list[float] = field(default_factory=list)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_table(cls, table: pd.DataFrame, covariates: list[str],
                   site_column: str | None = None, df: int | str = "auto") -> CovariateEncoder:
        """Learn the encoding from the training participants' rows.

        Parameters
        ----------
        table : pandas.DataFrame
            participants.tsv rows of the training subjects (values as read: strings).
        covariates : list of str
            Columns to model (may be empty when only ``site_column`` is given).
        site_column : str, optional
            Column of the participants' sites.
        df : int or "auto"
            Degrees of freedom of each numeric covariate (:func:`auto_df` for "auto").

        Raises
        ------
        CovariateError
            A column is missing, has a missing value, does not vary, or is named twice.
        """
        if len(set(covariates)) != len(covariates):
            raise CovariateError(f"--covariates {' '.join(covariates)}: a column is named twice")
        if site_column and site_column in covariates:
            raise CovariateError(f"{site_column!r} is both a covariate and the site column")
        n = len(table)
        degrees = auto_df(n) if df == "auto" else int(df)
        encoder = cls(covariates=list(covariates), site_column=site_column)
        for column in covariates:
            values = _column(table, column, "covariate")
            numbers = [_number(v) for v in values]
            if all(x is not None for x in numbers):
                array = np.asarray(numbers, dtype=float)
                if not array.max() > array.min():
                    raise CovariateError(f"covariate {column!r} has the same value "
                                         f"({array.min():g}) in every training participant: "
                                         "its effect cannot be learnt; drop it")
                encoder.numeric[column] = {
                    "df": degrees, "min": float(array.min()), "max": float(array.max()),
                    "mean": float(array.mean()), "sd": float(array.std()) or 1.0}
            else:
                levels = sorted({str(v).strip() for v in values})
                if len(levels) < 2:
                    raise CovariateError(f"covariate {column!r} has one value ({levels[0]}) in "
                                         "every training participant: its effect cannot be "
                                         "learnt; drop it")
                text = [v for v, x in zip(values, numbers, strict=True) if x is None]
                if 2 * len(text) <= n:  # mostly numbers: the text is a typo, not a level
                    raise CovariateError(f"covariate {column!r} mixes numbers and text "
                                         f"({text[0]!r}); a numeric column needs numbers only")
                encoder.levels[column] = levels
        if site_column:
            values = _column(table, site_column, "site column")
            encoder.sites = sorted({str(v).strip() for v in values})
        encoder.centers = [float(c) for c in encoder.design(table).mean(axis=0)[1:]]
        return encoder

    @classmethod
    def from_dict(cls, values: dict) -> CovariateEncoder:
        """The encoder stored by :meth:`to_dict`."""
        return cls(**values)

    def to_dict(self) -> dict:
        """JSON-ready description (stored in the model's hyperparameters)."""
        return asdict(self)

    # ------------------------------------------------------------------ design
    @property
    def columns(self) -> list[str]:
        """Names of the design's columns: intercept, then each covariate's functions."""
        names = ["intercept"]
        for column in self.covariates:
            if column in self.numeric:
                df = self.numeric[column]["df"]
                names += [column] if df == 1 else [f"{column}_bs{k + 1}" for k in range(df)]
            else:
                names += [f"{column}[{level}]" for level in self.levels[column][1:]]
        return names

    @property
    def needed(self) -> list[str]:
        """Every participants.tsv column a participant must have to be scored."""
        return [*self.covariates, *([self.site_column] if self.site_column else [])]

    def _spline(self, column: str, values: np.ndarray) -> np.ndarray:
        """The B-spline basis (knots over the fitted range, linear beyond it)."""
        from sklearn.preprocessing import SplineTransformer

        spec = self.numeric[column]
        df = spec["df"]
        degree = min(3, df)
        transformer = SplineTransformer(n_knots=df - degree + 2, degree=degree,
                                        knots="uniform", include_bias=False,
                                        extrapolation="linear")
        transformer.fit(np.array([[spec["min"]], [spec["max"]]]))
        return transformer.transform(values[:, None])

    def accept(self, table: pd.DataFrame) -> None:
        """Widen the accepted range of the numeric covariates to the rows of ``table``.

        The train level calls it with the held-out controls the threshold was calibrated on:
        the model was checked on them, so participants of their ages are accepted without
        ``--extrapolate``.
        """
        for column, spec in self.numeric.items():
            numbers = [x for x in (_number(v) for v in table[column]) if x is not None]
            low, high = spec.get("accepted", [spec["min"], spec["max"]])
            spec["accepted"] = [min([low, *numbers]), max([high, *numbers])]

    def check_range(self, table: pd.DataFrame) -> None:
        """Refuse numeric covariates outside the training range.

        Raises
        ------
        CovariateError
            A value outside [min, max] of the training participants (``--extrapolate`` lets
            the model extrapolate instead).
        """
        for column, spec in self.numeric.items():
            low, high = spec.get("accepted", [spec["min"], spec["max"]])
            for index, value in _column(table, column, "covariate").items():
                number = _number(value)
                if number is None:
                    continue
                if not low <= number <= high:
                    raise CovariateError(
                        f"{_who(table, index)}: {column} {number:g} is outside the model's "
                        f"training range [{low:g}, {high:g}]; its norms there are "
                        "extrapolated: pass --extrapolate to accept that, or use a model "
                        "trained on that range")

    def design(self, table: pd.DataFrame, extrapolate: bool = False) -> np.ndarray:
        """The ``(n, p)`` design of the rows of ``table`` (columns: :attr:`columns`).

        Raises
        ------
        CovariateError
            A missing column or value, text in a numeric column, an unknown level, or (without
            ``extrapolate``) a value outside the training range.
        """
        if not extrapolate:
            self.check_range(table)
        blocks = [np.ones((len(table), 1))]
        for column in self.covariates:
            values = _column(table, column, "covariate")
            if column in self.numeric:
                numbers = [_number(v) for v in values]
                bad = [(i, v) for (i, v), x in zip(values.items(), numbers, strict=True)
                       if x is None]
                if bad:
                    raise CovariateError(f"{_who(table, bad[0][0])}: covariate {column!r} is "
                                         f"{bad[0][1]!r}, not a number")
                array = np.asarray(numbers, dtype=float)
                spec = self.numeric[column]
                if spec["df"] == 1:
                    blocks.append(((array - spec["mean"]) / spec["sd"])[:, None])
                else:
                    blocks.append(self._spline(column, array))
            else:
                levels = self.levels[column]
                text = [str(v).strip() for v in values]
                unknown = [(i, v) for i, v in zip(values.index, text, strict=True)
                           if v not in levels]
                if unknown:
                    raise CovariateError(f"{_who(table, unknown[0][0])}: covariate {column!r} "
                                         f"is {unknown[0][1]!r}, a value the model was not "
                                         f"trained with ({', '.join(levels)})")
                blocks.append(np.array([[float(v == level) for level in levels[1:]]
                                        for v in text]).reshape(len(text), -1))
        design = np.concatenate(blocks, axis=1)
        if self.centers:
            design[:, 1:] -= np.asarray(self.centers)
        return design

    def site_index(self, table: pd.DataFrame, allow_new: bool = False) -> np.ndarray:
        """Each row's site as an index into :attr:`sites` (-1: no site column, or a new site).

        Raises
        ------
        CovariateError
            A missing site, or (unless ``allow_new``) a site the model was not trained with.
        """
        if not self.site_column:
            return np.full(len(table), -1, dtype=np.int64)
        values = _column(table, self.site_column, "site column")
        index = []
        for row, value in values.items():
            site = str(value).strip()
            if site in self.sites:
                index.append(self.sites.index(site))
            elif allow_new:
                index.append(-1)
            else:
                raise CovariateError(
                    f"{_who(table, row)}: site {site!r} ({self.site_column}) is not one the "
                    f"model was trained on ({', '.join(self.sites)}); adapt the model to it "
                    "with train --transfer MODEL on a few of that site's controls")
        return np.asarray(index, dtype=np.int64)

    def rows_for(self, table: pd.DataFrame, labels: list[str]) -> pd.DataFrame:
        """The rows of participants.tsv (with a ``label`` column) of ``labels``, in order.

        Raises
        ------
        CovariateError
            A participant without a row.
        """
        indexed = table.drop_duplicates("label").set_index("label", drop=False)
        absent = [label for label in labels if label not in indexed.index]
        if absent:
            raise CovariateError(f"sub-{absent[0]} has no row in participants.tsv, so its "
                                 f"covariates ({', '.join(self.needed)}) are unknown")
        return indexed.loc[labels].reset_index(drop=True)
