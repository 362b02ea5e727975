"""Registry commands: publish, list, show, pull, promote, rollback, label, delete, gc.

The common registry options come from :class:`adapterctl.registry.RegistryConfig`'s
fields (one definition: name, help, envvar). Errors are domain errors; the CLI
root prints them as one line and exits 1.
"""
from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import click

from adapterctl.errors import InvalidArgument
from adapterctl.options import click_options, from_kwargs
from adapterctl.refs import parse_ref
from adapterctl.registry import AliasState, Manifest, Registry, RegistryConfig
from adapterctl.registry.validate import infer_base_model


def registry_options(func):
    """Add ``--registry``, ``--s3-endpoint-url``, ``--s3-path-style``, ``--s3-region``
    and ``--quiet``; the command receives ``registry: Registry`` instead."""
    names = {f.name for f in dataclasses.fields(RegistryConfig)}

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        config = from_kwargs(RegistryConfig, kwargs)
        rest = {k: v for k, v in kwargs.items() if k not in names}
        return func(*args, registry=config.open(), **rest)

    return click_options(RegistryConfig)(wrapper)


def _labels(ctx, param, values: tuple[str, ...]) -> dict[str, str]:
    out = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx=ctx, param=param)
        out[key] = value
    return out


@click.command()
@click.argument("adapter_dir", type=click.Path(path_type=Path))
@click.option("--name", required=True, help="Adapter name; the version is the next integer.")
@click.option(
    "--label", "labels", multiple=True, callback=_labels, metavar="KEY=VALUE", help="Free-form label (repeatable)."
)
@click.option("--base-model", default=None,
              help="Base model id or directory, when neither adapterctl.json nor adapter_config.json's "
                   "base_model_name_or_path names one this machine has.")
@registry_options
def publish(adapter_dir: Path, name: str, labels: dict[str, str], base_model: str | None, registry: Registry) -> None:
    """Publish ADAPTER_DIR (a PEFT LoRA directory) and print NAME:VERSION."""
    if base_model is None:
        inferred = infer_base_model(adapter_dir, progress=not registry.quiet)
        if inferred is not None:
            click.echo(f"base model: {inferred.id} ({inferred.fingerprint[:19]}...) inferred from "
                       f"adapter_config.json base_model_name_or_path (at {inferred.path})", err=True)
    manifest = registry.publish(adapter_dir, name, labels=labels, base_model=base_model, progress=not registry.quiet)
    click.echo(manifest.ref)


@click.command("list")
@click.argument("name", required=False)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@registry_options
def list_(name: str | None, as_json: bool, registry: Registry) -> None:
    """List adapter names, or the versions of NAME."""
    if name is None:
        rows = [{"name": n, "latest": registry.latest_version(n)} for n in registry.list_names()]
        lines = [json.dumps(rows, indent=2)] if as_json else [f"{r['name']}\t{r['latest'] or '-'}" for r in rows]
        for line in lines:
            click.echo(line)
        return
    manifests = registry.list_versions(name)
    states = registry.alias_states(name)
    if as_json:
        click.echo(json.dumps([{**m.to_dict(), **_alias_fields(m, states)} for m in manifests], indent=2))
        return
    click.echo("VERSION\tCREATED\tSIZE\tRANK\tTARGETS\tALIASES\tDIGEST")
    for m in manifests:
        click.echo(f"{m.version}\t{m.created[:19]}\t{_size(m.total_bytes)}\t{m.lora.get('rank')}\t"
                   f"{','.join(m.lora.get('target_modules', []))}\t{','.join(_alias_marks(m, states)) or '-'}\t"
                   f"{m.digest[:19]}")


@click.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
@registry_options
def show(ref: str, as_json: bool, registry: Registry) -> None:
    """Show the manifest REF names (NAME, NAME:VERSION, NAME:ALIAS, NAME@sha256:...)."""
    manifest = registry.resolve(ref)
    states = registry.alias_states(manifest.name)
    labels = registry.labels(f"{manifest.name}@{manifest.digest}")
    parsed = parse_ref(ref)
    state = states.get(parsed.alias) if parsed.alias else None
    route = _route_dict(parsed.alias, state) if parsed.alias and state else None
    if as_json:
        doc = {**manifest.to_dict(), **_alias_fields(manifest, states), "labels": labels}
        if route:
            doc["route"] = route
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
        return
    lora, base = manifest.lora, manifest.base_model
    lines = [
        ("ref", manifest.ref),
        ("digest", manifest.digest),
        ("aliases", ", ".join(_alias_marks(manifest, states)) or "-"),
        (
            "created",
            f"{manifest.created} by {manifest.publisher.get('user')}@{manifest.publisher.get('host')} "
            f"({manifest.publisher.get('tool')})",
        ),
        ("base model", f"{base.get('id')} ({base.get('fingerprint')})"),
        (
            "lora",
            f"rank {lora.get('rank')}, alpha {lora.get('alpha')}, rsLoRA {'yes' if lora.get('use_rslora') else 'no'}, "
            f"targets {','.join(lora.get('target_modules', []))}, {lora.get('dtype')}",
        ),
        ("size", f"{_size(manifest.total_bytes)} in {len(manifest.files)} files"),
        ("labels", ", ".join(f"{k}={v}" for k, v in sorted(labels.items())) or "-"),
    ]
    if route:
        lines.insert(1, ("routing", ", ".join(f"{manifest.name}:{t['version']} {t['weight']:g}%"
                                              for t in (route["primary"], route["canary"]) if t)))
    training = manifest.training or {}
    if training:
        metrics = ", ".join(f"{k} {v}" for k, v in (training.get("metrics") or {}).items() if v is not None)
        dataset = (training.get("dataset") or {}).get("train_sha256")
        lines.append(("training", f"{metrics or '-'}; dataset {dataset or '-'}"))
    for key, value in lines:
        click.echo(f"{key + ':':<12}{value}")
    for entry in manifest.files:
        click.echo(f"  {entry.path:<28}{_size(entry.size):>10}  {entry.digest}")


@click.command()
@click.argument("ref")
@click.argument("dest", type=click.Path(path_type=Path))
@registry_options
def pull(ref: str, dest: Path, registry: Registry) -> None:
    """Download REF into DEST (a new or empty directory), verifying every sha256."""
    manifest = registry.resolve(ref)
    click.echo(str(registry.pull(manifest, dest, progress=not registry.quiet)))


@click.command()
@click.argument("ref", metavar="NAME:VERSION")
@click.argument("alias")
@click.option("--canary", type=click.FloatRange(0, 100, min_open=True, max_open=True), default=None,
              metavar="PERCENT", help="Keep ALIAS's primary and send PERCENT of its traffic to NAME:VERSION.")
@registry_options
def promote(ref: str, alias: str, canary: float | None, registry: Registry) -> None:
    """Point ALIAS at NAME:VERSION (compare-and-swap: fails if it moved meanwhile);
    with --canary, split ALIAS's traffic between its primary and NAME:VERSION."""
    name, version = _name_version(ref, "promote")
    previous = registry.promote(name, version, alias, canary=canary)
    if canary is not None:
        click.echo(f"{name}:{alias} -> {_routing(name, registry.alias_states(name)[alias])}")
        return
    click.echo(f"{name}:{alias} -> {name}:{version}" + (f" (was {previous})" if previous else ""))


@click.command()
@click.argument("name")
@click.argument("alias")
@registry_options
def rollback(name: str, alias: str, registry: Registry) -> None:
    """Drop ALIAS's canary if it has one, else move ALIAS back to its previous version."""
    before = registry.alias_states(name).get(alias)
    version = registry.rollback(name, alias)
    dropped = f" (canary {name}:{before.canary.version} dropped)" if before and before.canary else ""
    click.echo(f"{name}:{alias} -> {name}:{version}{dropped}")


@click.command()
@click.argument("ref", metavar="NAME:VERSION")
@click.argument("labels", nargs=-1, metavar="KEY=VALUE... | KEY-")
@registry_options
def label(ref: str, labels: tuple[str, ...], registry: Registry) -> None:
    """Set (KEY=VALUE) or remove (KEY-) labels of a published version; the manifest
    stays immutable (labels are kept beside it, compare-and-swap). Prints them all."""
    name, version = _name_version(ref, "label")
    remove = tuple(item[:-1] for item in labels if item.endswith("-") and "=" not in item)
    pairs = _labels(None, None, tuple(item for item in labels if "=" in item or not item.endswith("-")))
    for key, value in sorted(registry.set_labels(name, version, pairs, remove).items()):
        click.echo(f"{key}={value}")


@click.command()
@click.argument("ref", metavar="NAME:VERSION")
@click.option("--force", is_flag=True, help="Delete even if an alias points at the version.")
@registry_options
def delete(ref: str, force: bool, registry: Registry) -> None:
    """Delete one version (its number is never reused; run gc to free its blobs)."""
    name, version = _name_version(ref, "delete")
    registry.delete(name, version, force=force)
    click.echo(f"deleted {name}:{version}")


@click.command()
@click.option("--dry-run", is_flag=True, help="Only report what would be deleted.")
@click.option("--grace", "grace_seconds", type=click.FloatRange(min=0), default=3600.0, show_default=True,
              help="Keep unreferenced blobs younger than this many seconds (in-flight publishes).")
@registry_options
def gc(dry_run: bool, grace_seconds: float, registry: Registry) -> None:
    """Delete blobs that no version references."""
    report = registry.gc(dry_run=dry_run, grace_seconds=grace_seconds)
    verb = "would delete" if dry_run else "deleted"
    click.echo(f"{verb} {len(report.deleted)} blobs ({_size(report.freed_bytes)}); "
               f"kept {len(report.kept_recent)} recent, {report.referenced} referenced")
    for digest in report.deleted:
        click.echo(f"  {digest}")


def _name_version(ref: str, verb: str) -> tuple[str, int]:
    parsed = parse_ref(ref)
    if parsed.version is None:
        raise InvalidArgument(f"{verb} needs NAME:VERSION with a version number, got {ref!r}")
    return parsed.name, parsed.version


def _alias_marks(manifest: Manifest, states: dict[str, AliasState]) -> list[str]:
    """``prod`` for an alias sending all its traffic here, ``prod(10%)`` for a share."""
    out = []
    for alias, state in sorted(states.items()):
        share = state.versions().get(manifest.version)
        if share is not None:
            out.append(alias if share == 100 else f"{alias}({share:g}%)")
    return out


def _alias_fields(manifest: Manifest, states: dict[str, AliasState]) -> dict:
    """JSON: ``aliases`` (primary of), ``alias_weights`` ``{alias: percent}`` (every alias routing here)."""
    weights = {a: s.versions()[manifest.version] for a, s in sorted(states.items()) if manifest.version in s.versions()}
    return {"aliases": sorted(a for a, s in states.items() if s.version == manifest.version), "alias_weights": weights}


def _route_dict(alias: str, state: AliasState) -> dict:
    canary = state.canary
    return {"alias": alias, "primary": {"version": state.version, "weight": state.primary_weight},
            "canary": {"version": canary.version, "weight": canary.weight} if canary else None}


def _routing(name: str, state: AliasState) -> str:
    return ", ".join(f"{name}:{v} ({w:g}%)" for v, w in state.versions().items())


def _size(n: float) -> str:
    units = ("B", "KiB", "MiB", "GiB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} B" if i == 0 else f"{n:.1f} {units[i]}"

COMMANDS = [publish, list_, show, pull, promote, rollback, label, delete, gc]
