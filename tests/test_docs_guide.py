"""The user guide (docs/guide/) must keep up with the code.

Config keys, update/loss names and options, CLI commands and options are read from the code, so a new
key or command fails here until the guide mentions it; links and the mkdocs nav must point to files.
"""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel

from reloop.components import GENERATORS, LOSSES, MEMORIES, UPDATES
from reloop.config import Config, parse_config
from reloop.data.periods import PeriodsConfig
from reloop.data.sources import config as source_config
from reloop.memory.config import MemoryConfig
from reloop.models import MODELS
from reloop.models.base import ModelOptions

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "guide"
CONFIG_MD = GUIDE / "config.md"
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*$")


# --------------------------------------------------------------------------------------------------
# helpers


def _lines_outside_fences(text: str) -> list[tuple[str, bool]]:
    """(line, inside a ``` fence) for every line."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            out.append((line, True))
            fenced = not fenced
            continue
        out.append((line, fenced))
    return out


def sections(text: str) -> dict[str, str]:
    """Heading text -> the section's text: up to the next heading of the same or a higher level."""
    lines = _lines_outside_fences(text)
    heads = [
        (i, len(m.group(1)), m.group(2))
        for i, (line, fenced) in enumerate(lines)
        if not fenced and (m := HEADING.match(line))
    ]
    out = {}
    for n, (i, level, title) in enumerate(heads):
        end = next((j for j, lv, _ in heads[n + 1 :] if lv <= level), len(lines))
        out[title] = "\n".join(line for line, _ in lines[i:end])
    return out


def section(text: str, title: str) -> str:
    found = sections(text)
    assert title in found, f"{CONFIG_MD.name}: no heading {title!r} (headings: {sorted(found)})"
    return found[title]


def mentioned(key: str, text: str) -> bool:
    """``key`` written as code: `key`, or as the key of a code span such as `key: value` or `{key: w}`."""
    return re.search(r"`\{?" + re.escape(key) + r"(`|:)", text) is not None


def _models_in(annotation: object) -> set[type[BaseModel]]:
    found: set[type[BaseModel]] = set()
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.add(annotation)
    for arg in typing.get_args(annotation):
        found |= _models_in(arg)
    return found


def config_models(root: type[BaseModel]) -> list[type[BaseModel]]:
    """``root`` and every pydantic model reachable through its fields' annotations."""
    seen: list[type[BaseModel]] = []
    todo = [root]
    while todo:
        cls = todo.pop()
        if cls in seen:
            continue
        seen.append(cls)
        for f in cls.model_fields.values():
            todo.extend(_models_in(f.annotation))
    return seen


def yaml_keys(cls: type[BaseModel]) -> list[str]:
    """Field names as users write them (the alias where there is one, e.g. ``lambda``)."""
    return [f.alias or name for name, f in cls.model_fields.items()]


# --------------------------------------------------------------------------------------------------
# (a) every config key is in config.md, in its own section


def _config_cases() -> list[tuple[str, str, str]]:
    """(class name, YAML key, heading of config.md whose section must mention it)."""
    cases: list[tuple[str, str, str]] = []

    def add(cls: type[BaseModel], heading: str) -> None:
        cases.extend((cls.__name__, key, heading) for key in yaml_keys(cls))

    top = config_models(Config)
    add(Config, "Top level")
    by_name = {c.__name__: c for c in top}
    add(by_name["TrainConfig"], "`train`")
    add(by_name["ProtocolConfig"], "`protocol`")
    add(by_name["EncoderSettings"], "`encoder`")
    add(by_name["RunSpec"], "`runs`")
    add(by_name["CombineOptions"], "`combine`")
    add(by_name["HedgeOptions"], "`combine`")
    known = {"Config", "TrainConfig", "ProtocolConfig", "EncoderSettings", "RunSpec", "CombineOptions", "HedgeOptions"}
    known |= {"MemoryConfig", "AdaptConfig"}  # the `memory` section, below
    assert set(by_name) == known, f"new nested config model(s) {set(by_name) - known}: map them to a section here"
    add(PeriodsConfig, "`data`")
    for name, source_cls in source_config._by_source().items():
        heading = "`source: csv` and `source: parquet`" if name in ("csv", "parquet") else f"`source: {name}`"
        for cls in config_models(source_cls):
            cases.extend((cls.__name__, key, heading) for key in yaml_keys(cls) if key != "source")
    for cls in config_models(MemoryConfig):
        add(cls, "`memory`")
    for memory_cls in MEMORIES.values():
        add(memory_cls.Options, "`memory`")
    for generator_cls in GENERATORS.values():
        add(generator_cls.Options, "`generator`")
    add(ModelOptions, "`model`")
    for model_cls in MODELS.values():
        add(model_cls.Options, "`model`")
    return sorted(set(cases))


CONFIG_CASES = _config_cases()


@pytest.fixture(scope="module")
def config_md() -> str:
    return CONFIG_MD.read_text()


@pytest.fixture(scope="module")
def data_common(config_md: str) -> str:
    """The keys every source shares are documented once, before the per-source sections."""
    data = section(config_md, "`data`")
    return data.split("\n### ", 1)[0]


def test_every_config_key_is_documented(config_md: str, data_common: str) -> None:
    missing = []
    for cls, key, heading in CONFIG_CASES:
        text = section(config_md, heading)
        if heading.startswith("`source:"):
            text += data_common
        if not mentioned(key, text):
            missing.append(f"{cls}.{key} (section {heading})")
    assert not missing, "config keys missing from docs/guide/config.md:\n  " + "\n  ".join(missing)


def test_every_source_and_generator_name_is_documented(config_md: str) -> None:
    data, gen = section(config_md, "`data`"), section(config_md, "`generator`")
    assert [s for s in source_config._by_source() if not mentioned(s, data)] == []
    assert [g for g in GENERATORS if not mentioned(g, gen)] == []


def test_every_update_and_loss_option_is_documented(config_md: str) -> None:
    """The names and option keys the ``update`` and ``loss`` registries accept (a shorthand option is
    written as the name's value, ``{batch: 3}``, so the name documents it)."""
    update, loss = section(config_md, "`update`"), section(config_md, "`loss`")
    missing = []
    for registry, text in ((UPDATES, update), (LOSSES, loss)):
        for name, cls in registry.items():
            keys = [name] + [k for k in cls.Options.model_fields if k != cls.Options.shorthand]
            missing += [f"{registry.kind} {k}" for k in keys if not mentioned(k, text)]
    assert not missing, f"missing from docs/guide/config.md: {missing}"


def test_the_complete_example_validates(config_md: str) -> None:
    """The annotated example is a real config: top level and runs, the data source, the model options."""
    example = section(config_md, "A complete example")
    block = re.search(r"```yaml\n(.*?)```", example, re.S)
    assert block, "no ```yaml block in 'A complete example'"
    cfg = parse_config(yaml.safe_load(block.group(1)))
    source_config.parse_source_config(cfg.data)
    options = dict(cfg.model)
    MODELS[options.pop("name")].Options(**options)
    assert set(Config.model_fields) <= set(yaml.safe_load(block.group(1))), "the example omits a top-level section"


# --------------------------------------------------------------------------------------------------
# (b) every CLI command, subcommand and option is in the guide


def _guide_text() -> str:
    return "\n".join(p.read_text() for p in sorted(GUIDE.glob("*.md")))


def _command_paths() -> list[str]:
    """``run``, ``data inspect``, ... from the typer app's registered commands and groups."""
    from reloop.cli import app

    def walk(typer_app, prefix: str) -> list[str]:
        out = []
        for info in typer_app.registered_commands:
            name = info.name or info.callback.__name__.replace("_", "-")
            out.append(f"{prefix}{name}")
        for group in typer_app.registered_groups:
            name = group.name or group.typer_instance.info.name
            out.append(f"{prefix}{name}")
            out += walk(group.typer_instance, f"{prefix}{name} ")
        return out

    return walk(app, "")


def _options() -> list[str]:
    """Every long option of every command (and of ``reloop`` itself), as click sees them."""
    import typer.main

    from reloop.cli import app

    # duck-typed: recent typer versions vendor click, so its classes are not ``click.Option``
    def walk(cmd, path: str) -> list[str]:
        opts = [
            f"{path}: {o}"
            for p in cmd.params
            if getattr(p, "param_type_name", "") == "option"
            for o in p.opts + p.secondary_opts
            if o.startswith("--") and o != "--help"
        ]
        for name, sub in getattr(cmd, "commands", {}).items():
            opts += walk(sub, f"{path} {name}")
        return opts

    return walk(typer.main.get_command(app), "reloop")


def test_every_command_is_in_the_guide() -> None:
    text = _guide_text()
    paths = _command_paths()
    assert {"run", "data inspect", "bench paper"} <= set(paths)  # the walk found the groups
    missing = [p for p in paths if f"reloop {p}" not in text]
    assert not missing, f"commands missing from docs/guide/*.md (as 'reloop <command>'): {missing}"


def test_every_command_option_is_in_the_guide() -> None:
    text = _guide_text()
    options = _options()
    assert {"reloop: --threads", "reloop run: --resume", "reloop bench paper: --section"} <= set(options), (
        f"the walk over the CLI found too little: {options}"
    )
    missing = [o for o in options if o.split(": ")[1] not in text]
    assert not missing, f"options missing from docs/guide/*.md: {missing}"


def test_every_bench_section_is_in_the_guide() -> None:
    from reloop.bench.paper import GROUPS, SECTIONS

    text = (GUIDE / "quickstart.md").read_text()
    names = {s.name for s in SECTIONS if not s.group} | set(GROUPS)
    names |= {f"{s.group}-<model>" for s in SECTIONS if s.group}  # one section per model, named by group
    missing = sorted(n for n in names if f"`{n}`" not in text)
    assert not missing, f"bench paper sections missing from docs/guide/quickstart.md: {missing}"


# --------------------------------------------------------------------------------------------------
# (c) links and nav


LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def _slug(title: str) -> str:
    """The anchor both mkdocs (toc) and GitHub give a plain heading."""
    text = re.sub(r"[^\w\s-]", "", title.replace("`", "").lower())
    return re.sub(r"[-\s]+", "-", text).strip("-")


def _links() -> list[tuple[Path, str]]:
    out = []
    for page in sorted(GUIDE.glob("*.md")):
        for line, fenced in _lines_outside_fences(page.read_text()):
            if not fenced:
                out += [(page, target) for target in LINK.findall(re.sub(r"`[^`]*`", "", line))]
    return out


def test_relative_links_point_to_files_and_headings() -> None:
    links = _links()
    assert links, "no links found: the pattern is broken"
    bad = []
    for page, target in links:
        if re.match(r"[a-z]+:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            bad.append(f"{page.name}: {target} (no such file)")
        elif anchor and dest.suffix == ".md":
            anchors = {_slug(t) for t in sections(dest.read_text())}
            if anchor not in anchors:
                bad.append(f"{page.name}: {target} (no heading with anchor #{anchor})")
    assert not bad, "broken links:\n  " + "\n  ".join(bad)


class _TolerantLoader(yaml.SafeLoader):
    """mkdocs.yml uses ``!!python/name:`` tags (the mermaid fence); read them as plain strings."""


_TolerantLoader.add_multi_constructor("tag:yaml.org,2002:python/", lambda loader, suffix, node: suffix)


def _nav_files(node: object) -> list[str]:
    if isinstance(node, str):
        return [node]
    if isinstance(node, list):
        return [f for item in node for f in _nav_files(item)]
    if isinstance(node, dict):
        return [f for value in node.values() for f in _nav_files(value)]
    return []


def test_mkdocs_nav_points_to_files() -> None:
    conf = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_TolerantLoader)
    docs = ROOT / conf.get("docs_dir", "docs")
    files = _nav_files(conf["nav"])
    assert [f for f in files if not (docs / f).is_file()] == []
    guide_pages = {f"guide/{p.name}" for p in GUIDE.glob("*.md")}
    assert guide_pages <= set(files), f"guide pages missing from the nav: {guide_pages - set(files)}"
