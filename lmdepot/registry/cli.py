"""`lmdepot registry ...` commands."""

from __future__ import annotations

import json
import re

import click

from lmdepot.registry.refs import ANY, check_digest

_registry_opt = click.option("--registry", "registry_url", default=None, metavar="URL",
                             help="Store URL (any fsspec URL: a path, file://, memory://, s3://). "
                                  "Default: $LMDEPOT_REGISTRY, else a directory in the user cache.")


def _open(url):
    from lmdepot.registry.core import Registry

    # `lmdepot registry --registry URL CMD` and `lmdepot registry CMD --registry URL` both work.
    group_url = (click.get_current_context().find_object(dict) or {}).get("registry")
    return Registry(url or group_url)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _duration(text: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smhd]?)", text.strip())
    if not m:
        raise click.BadParameter(f"{text!r} is not a duration like 30s, 15m, 1h or 2d")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _expect(value):
    if value is None:
        return ANY
    return None if value in ("none", "") else check_digest(value)


@click.group()
@click.option("--registry", "registry_url", default=None, metavar="URL",
              help="Store URL for every subcommand (default: $LMDEPOT_REGISTRY, else the user cache).")
@click.pass_context
def registry(ctx, registry_url):
    """Content-addressed workspace registry on any fsspec URL."""
    ctx.obj = {"registry": registry_url}


@registry.command()
@click.argument("workspace", type=click.Path(file_okay=False))
@click.argument("ref")
@_registry_opt
def push(workspace, ref, registry_url):
    """Upload WORKSPACE as NAME:TAG; only blobs the store lacks are uploaded."""
    reg = _open(registry_url)
    res = reg.push(workspace, ref)
    if res.unchanged:
        click.echo(f"{ref} already points at {res.digest} with the same content; nothing uploaded")
        return
    for b in sorted(res.uploaded, key=lambda b: b.path):
        click.echo(f"uploaded {b.path} {b.digest[:19]} {_size(b.size)}")
    for b in sorted(res.skipped, key=lambda b: b.path):
        click.echo(f"skipped  {b.path} (already in the store)")
    click.echo(f"pushed {ref} {res.digest}: uploaded {len(res.uploaded)} blobs ({_size(res.uploaded_bytes)}), "
               f"skipped {len(res.skipped)}")


@registry.command()
@click.argument("ref")
@click.option("--rank", type=click.IntRange(0), default=None, help="Fetch only this rank's files and shared ones.")
@click.option("--dst", type=click.Path(file_okay=False), default=None,
              help="Materialize here (default: a snapshot in the local cache).")
@_registry_opt
def pull(ref, rank, dst, registry_url):
    """Fetch NAME:TAG or NAME@sha256:<hex>; prints the local workspace path."""
    from lmdepot.registry.pull import pull as do_pull

    res = do_pull(_open(registry_url), ref, rank=rank, dst=dst)
    click.echo(f"fetched {len(res.fetched)} blobs ({_size(res.fetched_bytes)}), {len(res.cached)} from cache",
               err=True)
    click.echo(str(res.path))


@registry.command()
@click.argument("name")
@_registry_opt
def tags(name, registry_url):
    """List the tags of NAME and the version each points at."""
    from lmdepot.registry.refs import check_name

    reg = _open(registry_url)
    found = reg.tags.list_tags(check_name(name))
    if not found:
        from lmdepot.registry.store import RegistryError

        raise RegistryError(f"{name}: no tags in {reg.url}")
    for tag, digest in found.items():
        click.echo(f"{tag}\t{digest}")


@registry.command()
@_registry_opt
def ls(registry_url):
    """List names with their tags."""
    for name, tag_map in _open(registry_url).ls().items():
        click.echo(f"{name}\t{', '.join(tag_map)}")


@registry.command()
@click.argument("ref")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per line.")
@_registry_opt
def log(ref, as_json, registry_url):
    """Every move of NAME's tags (or of NAME:TAG): from, to, when, by whom."""
    from lmdepot.registry.refs import parse_ref

    r = parse_ref(ref, tag_required=False)
    for e in _open(registry_url).log(r.name, r.tag):
        if as_json:
            click.echo(json.dumps(e, sort_keys=True))
        else:
            click.echo(f"{e['when']}  {r.name}:{e['tag']}  {e.get('action', 'tag'):<4}  "
                       f"{e['from'] or '-'} -> {e['to'] or '-'}  by {e['by']}")


@registry.command()
@click.argument("src")
@click.argument("new_tag")
@click.option("--expect", default=None,
              help="Move only if NEW_TAG now points at this digest ('none': only if unset); else fail.")
@_registry_opt
def tag(src, new_tag, expect, registry_url):
    """Point NEW_TAG (or NAME:NEW_TAG) at SRC's version, by compare-and-swap."""
    e = _open(registry_url).tag(src, new_tag, expect=_expect(expect))
    click.echo(f"{e['tag']}: {e['from'] or '-'} -> {e['to']} (generation {e['generation']})")


@registry.command()
@click.argument("ref")
@click.option("--expect", default=None, help="Remove only if the tag points at this digest.")
@_registry_opt
def rm(ref, expect, registry_url):
    """Remove tag NAME:TAG (the move is logged; gc reclaims the unreferenced data)."""
    e = _open(registry_url).rm(ref, expect=_expect(expect))
    click.echo(f"removed {ref} (was {e['from']})")


@registry.command()
@click.argument("ref")
@_registry_opt
def verify(ref, registry_url):
    """Re-hash every blob of NAME:TAG or NAME@DIGEST in the store."""
    digest, n = _open(registry_url).verify(ref)
    click.echo(f"{ref} {digest}: {n} blobs verified")


@registry.command()
@click.option("--grace", default="1h", show_default=True, help="Never delete objects younger than this.")
@click.option("--dry-run", is_flag=True, help="Only print what would be deleted.")
@_registry_opt
def gc(grace, dry_run, registry_url):
    """Delete blobs and manifests that no tag reaches (mark and sweep)."""
    rep = _open(registry_url).gc(_duration(grace), dry_run)
    for key in rep.deleted:
        click.echo(f"{'would delete' if dry_run else 'deleted'} {key}")
    click.echo(f"{'would free' if dry_run else 'freed'} {_size(rep.deleted_bytes)} in {len(rep.deleted)} objects; "
               f"kept {rep.kept_manifests} manifests, {rep.kept_blobs} blobs, {len(rep.young)} young objects")


@registry.command()
@click.argument("a")
@click.argument("b")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@click.option("--tensors", is_flag=True, help="Compare changed weight files tensor by tensor (ranged reads).")
@click.option("--top", default=5, show_default=True, type=click.IntRange(1), help="How many top KV changes to list.")
@_registry_opt
def diff(a, b, as_json, tensors, top, registry_url):
    """Compare two versions: config.ini, KV scales, weights, provenance."""
    from lmdepot.registry.audit import diff as do_diff, format_diff

    d = do_diff(_open(registry_url), a, b, tensors=tensors, top=top)
    click.echo(json.dumps(d, indent=2, sort_keys=True) if as_json else format_diff(d))


@registry.command()
@click.argument("name")
@click.option("--plot", type=click.Path(dir_okay=False), default=None, help="Draw per-layer K/V scales to this PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print machine-readable JSON.")
@_registry_opt
def audit(name, plot, as_json, registry_url):
    """How config.ini and KV scales evolved across every version of NAME."""
    from lmdepot.registry.audit import audit as do_audit, format_audit, plot_audit

    rows = do_audit(_open(registry_url), name)
    click.echo(json.dumps(rows, indent=2, sort_keys=True) if as_json else format_audit(rows))
    if plot:
        plot_audit(rows, plot)
        click.echo(f"wrote {plot}", err=True)
