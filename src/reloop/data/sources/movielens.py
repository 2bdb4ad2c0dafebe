"""GroupLens MovieLens in its three official layouts, as a canonical click log.

=============  =======================  ====================  ==================================
release        ratings                  items (genres)        users
=============  =======================  ====================  ==================================
100K           ``u.data`` (tab)         ``u.item`` flags +    ``u.user`` age|gender|occupation|zip
                                        ``u.genre`` (latin-1)
1M             ``ratings.dat`` (``::``) ``movies.dat``        ``users.dat`` gender::age::occ::zip
                                        (latin-1)
latest/20M/25M ``ratings.csv`` (header) ``movies.csv``        (none)
=============  =======================  ====================  ==================================

Columns: ``label`` (rating >= ``label.rating_at_least``), ``time``, ``user_id``, ``item_id``,
``genres`` (sequence; multi-hot), ``age`` (bucket ``<18, 18-24, 25-34, 35-44, 45-49, 50-55, 56+``;
1M's age codes map to the same buckets), ``gender``, ``occupation`` (100K names, 1M codes) when the
users file exists, and ``history`` (sequence sharing ``item_id``'s vocabulary: the user's last N
*positive* items strictly before the event, most recent first) when ``history`` is set.

Implicit mode (``implicit:``, the ASMG protocol of METHODS-notes §3.1): the ratings with label 1
are the positives; each is followed by ``negatives`` rows with an item drawn uniformly from the
candidates, rejecting items the user rated (at any rating) at or before the event time; negatives
copy the positive's user, time, user features and history. Ratings below the threshold are not rows
of the implicit log: they only exclude items from the negatives.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from reloop.data.schema import FeatureSchema, FeatureSpec
from reloop.data.sources.config import LABEL, SOURCES, TIME, ImplicitConfig, MovieLensSourceConfig
from reloop.data.sources.tabular import history_column
from reloop.data.validate import DataError, LoadedLog, RowChecker, parse_time, require_columns

_LAYOUTS = {"u.data": "100k", "ratings.dat": "1m", "ratings.csv": "25m"}
_RATING_COLS = ["user_id", "item_id", "rating", "timestamp"]
GENRES_100K = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary", "Drama",
    "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western",
]  # fmt: skip
AGE_BUCKETS_1M = {"1": "<18", "18": "18-24", "25": "25-34", "35": "35-44", "45": "45-49", "50": "50-55", "56": "56+"}
_NO_GENRES = "(no genres listed)"


def detect_layout(path: str | Path) -> tuple[str, Path]:
    """``("100k" | "1m" | "25m", directory)``; raises FileNotFoundError naming the expected files."""
    p = Path(path)
    if p.is_file() and p.name in _LAYOUTS:
        p = p.parent
    if p.is_dir():
        for name, layout in _LAYOUTS.items():
            if (p / name).is_file():
                return layout, p
    state = "is not a directory" if not p.exists() else "holds none of the expected ratings files"
    raise FileNotFoundError(
        f"MovieLens data not found: {p} {state}; expected a directory with u.data (+ u.item, u.genre, u.user; "
        f"MovieLens 100K), ratings.dat (+ movies.dat, users.dat; 1M) or ratings.csv (+ movies.csv; latest/20M/25M)"
    )


# --------------------------------------------------------------------------------------------------
# raw readers (every value as a string; parsing and bad-row accounting below)


def _read_delimited(
    data: bytes | Path, sep: str, columns: list[str] | None, where: str, header: bool = False
) -> pl.DataFrame:
    try:
        df = pl.read_csv(
            data,
            separator=sep,
            has_header=header,
            infer_schema=False,
            quote_char=None if not header else '"',
        )
    except pl.exceptions.NoDataError:
        return pl.DataFrame({c: [] for c in columns or []}, schema={c: pl.String for c in columns or []})
    except pl.exceptions.PolarsError as e:
        raise DataError(f"{where}: cannot parse: {e}") from e
    if columns is not None:
        if df.width < len(columns):
            raise DataError(f"{where}: expected at least {len(columns)} fields per line, found {df.width}")
        df = df.select(df.columns[: len(columns)]).rename(dict(zip(df.columns[: len(columns)], columns)))
    return df


def _dat_bytes(path: Path, encoding: str = "latin-1") -> bytes:
    """A ``::``-separated file as UTF-8 tab-separated bytes."""
    text = path.read_bytes().decode(encoding)
    return text.replace("::", "\t").encode("utf-8")


def _read_ratings(layout: str, root: Path) -> pl.DataFrame:
    if layout == "100k":
        return _read_delimited(root / "u.data", "\t", _RATING_COLS, str(root / "u.data"))
    if layout == "1m":
        return _read_delimited(_dat_bytes(root / "ratings.dat"), "\t", _RATING_COLS, str(root / "ratings.dat"))
    f = root / "ratings.csv"
    df = _read_delimited(f, ",", None, str(f), header=True)
    need = ["userId", "movieId", "rating", "timestamp"]
    require_columns(df.columns, [(c, "ratings") for c in need], str(f))
    return df.select(need).rename(dict(zip(need, _RATING_COLS)))


def _read_items(layout: str, root: Path) -> pl.DataFrame | None:
    """``item_id`` (String, unique) -> ``genres`` (List(String)); None when the file is absent."""
    if layout == "100k":
        f = root / "u.item"
        if not f.is_file():
            return None
        names = GENRES_100K
        g = root / "u.genre"
        if g.is_file():
            rows = [ln.rsplit("|", 1) for ln in g.read_bytes().decode("latin-1").splitlines() if ln.strip()]
            names = [name for name, _ in sorted(rows, key=lambda r: int(r[1]))]
        raw = _read_delimited(f.read_bytes().decode("latin-1").encode("utf-8"), "|", None, str(f))
        if raw.width != 5 + len(names):
            raise DataError(
                f"{f}: expected {5 + len(names)} '|'-separated fields (5 + {len(names)} genre flags), found {raw.width}"
            )
        flags = raw.columns[5:]
        genres = pl.concat_list(
            [pl.when(pl.col(c).str.strip_chars() == "1").then(pl.lit(n)).otherwise(None) for c, n in zip(flags, names)]
        ).list.drop_nulls()
        df = raw.select(pl.col(raw.columns[0]).str.strip_chars().alias("item_id"), genres.alias("genres"))
    else:
        if layout == "1m":
            f = root / "movies.dat"
            if not f.is_file():
                return None
            raw = _read_delimited(_dat_bytes(f), "\t", ["item_id", "title", "genres"], str(f))
        else:
            f = root / "movies.csv"
            if not f.is_file():
                return None
            raw = _read_delimited(f, ",", None, str(f), header=True)
            require_columns(raw.columns, [("movieId", "items"), ("genres", "items")], str(f))
            raw = raw.rename({"movieId": "item_id"})
        df = raw.select(
            pl.col("item_id").str.strip_chars(),
            pl.col("genres")
            .fill_null("")
            .str.split("|")
            .list.eval(pl.element().filter((pl.element() != "") & (pl.element() != _NO_GENRES))),
        )
    return df.unique(subset="item_id", keep="first", maintain_order=True)


def _age_bucket(age: pl.Expr) -> pl.Expr:
    a = age.cast(pl.Float64, strict=False)
    return (
        pl.when(a < 18).then(pl.lit("<18"))
        .when(a < 25).then(pl.lit("18-24"))
        .when(a < 35).then(pl.lit("25-34"))
        .when(a < 45).then(pl.lit("35-44"))
        .when(a < 50).then(pl.lit("45-49"))
        .when(a < 56).then(pl.lit("50-55"))
        .when(a >= 56).then(pl.lit("56+"))
        .otherwise(None)
    )  # fmt: skip


def _read_users(layout: str, root: Path) -> pl.DataFrame | None:
    """``user_id`` -> ``age``, ``gender``, ``occupation`` (String); None when absent."""
    if layout == "100k":
        f = root / "u.user"
        if not f.is_file():
            return None
        raw = _read_delimited(
            f.read_bytes().decode("latin-1").encode("utf-8"), "|", ["user_id", "age", "gender", "occupation"], str(f)
        )
        age = _age_bucket(pl.col("age").str.strip_chars())
    elif layout == "1m":
        f = root / "users.dat"
        if not f.is_file():
            return None
        raw = _read_delimited(_dat_bytes(f), "\t", ["user_id", "gender", "age", "occupation"], str(f))
        age = pl.col("age").str.strip_chars().replace_strict(AGE_BUCKETS_1M, default=None, return_dtype=pl.String)
    else:
        return None
    df = raw.select(
        pl.col("user_id").str.strip_chars(),
        age.alias("age"),
        pl.col("gender").str.strip_chars(),
        pl.col("occupation").str.strip_chars(),
    )
    return df.unique(subset="user_id", keep="first", maintain_order=True)


# --------------------------------------------------------------------------------------------------


def _clean_ratings(
    raw: pl.DataFrame, threshold: float, max_bad_share: float, where: str
) -> tuple[pl.DataFrame, RowChecker]:
    checker = RowChecker(raw.height, where)
    user = raw["user_id"].str.strip_chars()
    item = raw["item_id"].str.strip_chars()
    checker.flag("user_id", "missing", user.is_null() | (user == ""))
    checker.flag("item_id", "missing", item.is_null() | (item == ""))
    rating = raw["rating"].str.strip_chars().cast(pl.Float64, strict=False)
    checker.flag("rating", "missing", raw["rating"].is_null())
    checker.flag("rating", "not a number", raw["rating"].is_not_null() & (rating.is_null() | rating.is_nan()))
    time, problems = parse_time(raw["timestamp"])
    for problem, mask in problems.items():
        checker.flag("timestamp", problem, mask)
    checker.enforce(max_bad_share)
    frame = pl.DataFrame(
        {
            LABEL: (rating >= threshold).fill_null(False).cast(pl.Int8),
            TIME: time,
            "user_id": user,
            "item_id": item,
            "__row": pl.Series(np.arange(raw.height, dtype=np.int64)),
        }
    )
    frame = frame.filter(pl.Series(checker.keep)).sort([TIME, "__row"])  # stable by construction
    return frame, checker


def _codes(s: pl.Series) -> tuple[np.ndarray, pl.Series]:
    """Integer codes 0..n-1 and the sorted unique values they index."""
    uniq = s.unique().sort()
    codes = s.rank("dense").cast(pl.Int64).to_numpy() - 1
    return codes, uniq


def _sample_negatives(
    users: np.ndarray,
    items: np.ndarray,
    times: np.ndarray,
    pos: np.ndarray,
    n_items: int,
    cfg: ImplicitConfig,
) -> np.ndarray:
    """(P, negatives) item codes; -1 where no admissible item exists (user rated every candidate)."""
    rng = np.random.default_rng(cfg.seed)
    # first time each (user, item) pair was rated: the log is time-sorted, so first occurrence = min
    pair = users * np.int64(n_items) + items
    pair_keys, first_idx = np.unique(pair, return_index=True)
    pair_first_time = times[first_idx]

    p_users = np.repeat(users[pos], cfg.negatives)
    p_times = np.repeat(times[pos], cfg.negatives)
    if cfg.candidates == "seen":
        item_first = np.full(n_items, np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(item_first, items, times)
        seen_order = np.argsort(item_first, kind="stable")
        n_seen = np.searchsorted(item_first[seen_order], p_times, side="right")

        def draw(idx: np.ndarray) -> np.ndarray:
            return seen_order[(rng.random(len(idx)) * n_seen[idx]).astype(np.int64)]

    else:

        def draw(idx: np.ndarray) -> np.ndarray:
            return rng.integers(0, n_items, size=len(idx), dtype=np.int64)

    out = np.full(len(p_users), -1, dtype=np.int64)
    todo = np.arange(len(p_users))
    for _ in range(200):
        if len(todo) == 0:
            break
        cand = draw(todo)
        key = p_users[todo] * np.int64(n_items) + cand
        at = np.minimum(np.searchsorted(pair_keys, key), len(pair_keys) - 1)
        rejected = (pair_keys[at] == key) & (pair_first_time[at] <= p_times[todo])
        out[todo[~rejected]] = cand[~rejected]
        todo = todo[rejected]
    return out.reshape(len(pos), cfg.negatives)


def load_movielens(cfg: MovieLensSourceConfig) -> LoadedLog:
    layout, root = detect_layout(cfg.path)
    where = f"MovieLens {layout.upper()} at {root}"
    threshold = cfg.label.rating_at_least
    ratings, checker = _clean_ratings(_read_ratings(layout, root), threshold, cfg.max_bad_share, where)
    items = _read_items(layout, root)
    users = _read_users(layout, root) if cfg.user_features else None
    notes: list[str] = []
    if items is None:
        notes.append("no item file: no 'genres' feature")
    if cfg.user_features and users is None and layout != "25m":
        notes.append("no users file: no user features")

    user_codes, _ = _codes(ratings["user_id"])
    item_codes, item_values = _codes(ratings["item_id"])
    times = ratings[TIME].to_numpy()
    labels = ratings[LABEL].to_numpy()
    pos = np.flatnonzero(labels == 1)

    if cfg.implicit is None:
        frame = ratings.select(LABEL, TIME, "user_id", "item_id")
        src = np.arange(ratings.height)
        out_items = item_codes
    else:
        neg = _sample_negatives(user_codes, item_codes, times, pos, len(item_values), cfg.implicit)
        n_neg = cfg.implicit.negatives
        block = np.concatenate([item_codes[pos][:, None], neg], axis=1).ravel()
        lab = np.tile(np.r_[1, np.zeros(n_neg, dtype=np.int64)], len(pos)).astype(np.int8)
        src = np.repeat(pos, n_neg + 1)
        keep = block >= 0
        failed = int((~keep).sum())
        block, lab, src = block[keep], lab[keep], src[keep]
        out_items = block
        frame = pl.DataFrame(
            {
                LABEL: pl.Series(lab, dtype=pl.Int8),
                TIME: ratings[TIME].gather(src),
                "user_id": ratings["user_id"].gather(src),
                "item_id": item_values.gather(out_items),
            }
        )
        notes.append(
            f"implicit: {len(pos):,} positives (rating >= {threshold:g}) + {len(block) - len(pos):,} sampled negatives "
            f"({n_neg} per positive, candidates={cfg.implicit.candidates}, seed={cfg.implicit.seed}); "
            f"{ratings.height - len(pos):,} ratings below {threshold:g} only exclude items from the negatives"
        )
        if failed:
            notes.append(f"implicit: {failed:,} negatives not drawn (the user had rated every candidate item)")

    features = [FeatureSpec(name="user_id"), FeatureSpec(name="item_id")]
    if items is not None:
        table = pl.DataFrame({"item_id": item_values}).join(items, on="item_id", how="left", maintain_order="left")
        genres = table["genres"].fill_null(pl.Series([[]], dtype=pl.List(pl.String)))
        frame = frame.with_columns(genres.gather(out_items).alias("genres"))
        n_genres = max(1, items["genres"].explode().drop_nulls().n_unique())
        features.append(FeatureSpec(name="genres", kind="sequence", max_len=n_genres))
    if users is not None:
        joined = ratings.select("user_id").join(users, on="user_id", how="left", maintain_order="left")
        cols = ["age", "gender", "occupation"]
        frame = frame.with_columns([joined[c].gather(src).alias(c) for c in cols])
        features += [FeatureSpec(name=c) for c in cols]
        unknown = int(joined["gender"].is_null().sum())
        if unknown:
            notes.append(f"{unknown:,} ratings by users absent from the users file: user features null")
    history = cfg.history_len
    if history is not None:
        hist = history_column(
            user_codes[pos], times[pos], ratings["item_id"].gather(pos), user_codes[src], times[src], history
        )
        frame = frame.with_columns(hist)
        features.append(FeatureSpec(name="history", kind="sequence", vocab="item_id", max_len=history))

    report = checker.report()
    report.notes.extend(notes)
    schema = FeatureSchema(features=features, label=LABEL, time=TIME, user="user_id")
    return LoadedLog(frame=frame, schema=schema, report=report)


@SOURCES.register("movielens")
class MovieLensSource:
    """``source: movielens``: a GroupLens MovieLens directory."""

    Options = MovieLensSourceConfig
    load = staticmethod(load_movielens)
