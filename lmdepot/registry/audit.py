"""diff and audit: what changed between versions, read straight from the store.

Only small files (config text in the manifest, KV scale files) are fetched whole; weight files are
compared by digest, and with --tensors through safetensors headers and ranged reads, since
safetensors itself cannot read part of a remote file.
"""

from __future__ import annotations

import configparser
import json
import re

from lmdepot.registry.store import RegistryError
from lmdepot.registry.version import Version, blob_key

_KV_RE = re.compile(r"^weights/layers\.(\d+)\.past_kv_scale\.(\d+)\.weight$")
PARAMS = ("k_scale", "k_zero", "v_scale", "v_zero")


def _config(text: str) -> dict[str, str]:
    parser = configparser.ConfigParser(interpolation=None)
    parser.optionxform = str
    try:
        parser.read_string(text)
    except configparser.Error as exc:
        raise RegistryError(f"config.ini in the manifest is not a valid ini file: {str(exc).splitlines()[0]}") from None
    return {(k if s == "llama" else f"{s}.{k}"): v for s in parser.sections() for k, v in parser.items(s)}


def _dict_diff(a: dict, b: dict) -> dict:
    return {"added": {k: b[k] for k in sorted(b.keys() - a.keys())},
            "removed": {k: a[k] for k in sorted(a.keys() - b.keys())},
            "changed": {k: [a[k], b[k]] for k in sorted(a.keys() & b.keys()) if a[k] != b[k]}}


def _kv(reg, version: Version, cache: dict) -> dict[tuple[int, int], list[list[float]]]:
    """(layer, global kv head) -> [k_scale, k_zero, v_scale, v_zero] from a version's KV files."""
    import numpy as np

    out = {}
    for b in version.files:
        m = _KV_RE.match(b.path)
        if not m:
            continue
        if b.digest not in cache:
            raw = reg.store.read(blob_key(b.digest))
            if raw is None or len(raw) != b.size or len(raw) % 16:
                raise RegistryError(f"blob {b.digest} ({b.path}) is missing or not a KV scale file")
            cache[b.digest] = np.frombuffer(raw, dtype="<f4").reshape(-1, 4).tolist()
        rows = cache[b.digest]
        layer, rank = int(m.group(1)), int(m.group(2))
        for h, row in enumerate(rows):
            out[(layer, rank * len(rows) + h)] = row
    return out


def _kv_diff(a: dict, b: dict, top: int) -> dict:
    changes = []
    for key in sorted(a.keys() & b.keys()):
        for i, param in enumerate(PARAMS):
            x, y = a[key][i], b[key][i]
            if x != y:
                delta = abs(y - x)
                changes.append({"layer": key[0], "head": key[1], "param": param, "a": x, "b": y, "abs": delta,
                                "rel": delta / abs(x) if x else float("inf")})
    changes.sort(key=lambda c: (-c["abs"], c["layer"], c["head"]))
    return {"compared": len(a.keys() & b.keys()), "changed": len(changes),
            "max_abs": max((c["abs"] for c in changes), default=0.0),
            "max_rel": max((c["rel"] for c in changes), default=0.0),
            "top": changes[:top],
            "only_in_a": [list(k) for k in sorted(a.keys() - b.keys())],
            "only_in_b": [list(k) for k in sorted(b.keys() - a.keys())]}


class _RangedReader:
    """A file object over ranged reads of one blob, enough for read_header."""

    def __init__(self, store, key: str):
        self.store, self.key, self.pos = store, key, 0

    def read(self, n: int) -> bytes:
        data = self.store.read_range(self.key, start=self.pos, end=self.pos + n)
        self.pos += len(data)
        return data


def _tensor_diff(reg, a_digest: str, b_digest: str, path: str) -> dict:
    import torch

    from lmdepot.formats.tensors import DTYPES, read_header

    def open_(digest):
        key = blob_key(digest)
        header, start = read_header(_RangedReader(reg.store, key), f"{path} ({digest})")
        return key, header, start

    (ka, ha, sa), (kb, hb, sb) = open_(a_digest), open_(b_digest)
    out = {}
    for name in sorted(ha.keys() | hb.keys()):
        if name not in ha or name not in hb:
            out[name] = {"status": "added" if name in hb else "removed"}
            continue
        ia, ib = ha[name], hb[name]
        if ia["shape"] != ib["shape"] or ia["dtype"] != ib["dtype"]:
            out[name] = {"status": "reshaped", "a": [ia["dtype"], ia["shape"]], "b": [ib["dtype"], ib["shape"]]}
            continue
        ra = reg.store.read_range(ka, start=sa + ia["data_offsets"][0], end=sa + ia["data_offsets"][1])
        rb = reg.store.read_range(kb, start=sb + ib["data_offsets"][0], end=sb + ib["data_offsets"][1])
        if ra == rb:
            continue
        if ia["dtype"] not in DTYPES:
            out[name] = {"status": "changed"}
            continue
        ta = torch.frombuffer(bytearray(ra), dtype=DTYPES[ia["dtype"]]).float()
        tb = torch.frombuffer(bytearray(rb), dtype=DTYPES[ib["dtype"]]).float()
        d = tb - ta
        norm = float(ta.norm())
        out[name] = {"status": "changed", "max_abs": float(d.abs().max()),
                     "rel_norm": float(d.norm()) / norm if norm else float("inf")}
    return out


def diff(reg, a: str, b: str, tensors: bool = False, top: int = 5) -> dict:
    ra, da, va = reg.get(a)
    rb, db, vb = reg.get(b)
    fa, fb = {f.path: f for f in va.files}, {f.path: f for f in vb.files}
    kv_cache: dict = {}
    weights = {"changed": [], "unchanged": [], "added": [], "removed": []}
    for path in sorted(fa.keys() | fb.keys()):
        if path.startswith("weights/") and not _KV_RE.match(path):
            kind = ("added" if path not in fa else "removed" if path not in fb
                    else "unchanged" if fa[path].digest == fb[path].digest else "changed")
            weights[kind].append(path)
    other = sorted(p for p in fa.keys() | fb.keys() if not p.startswith("weights/")
                   and p not in ("manifest.json", "config.ini")
                   and (p not in fa or p not in fb or fa[p].digest != fb[p].digest))
    out = {"a": {"ref": str(ra), "digest": da}, "b": {"ref": str(rb), "digest": db},
           "config": _dict_diff(_config(va.config), _config(vb.config)),
           "kv_scales": _kv_diff(_kv(reg, va, kv_cache), _kv(reg, vb, kv_cache), top),
           "weights": weights, "other_files_changed": other,
           "provenance": _dict_diff({k: json.dumps(v, sort_keys=True) for k, v in va.provenance.items()},
                                    {k: json.dumps(v, sort_keys=True) for k, v in vb.provenance.items()})}
    if tensors:
        out["tensors"] = {p: _tensor_diff(reg, fa[p].digest, fb[p].digest, p) for p in weights["changed"]
                          if p.endswith(".safetensors")}
    return out


def format_diff(d: dict) -> str:
    def head(side):
        ref, digest = d[side]["ref"], d[side]["digest"]
        return ref if ref.endswith(digest) else f"{ref} {digest}"

    lines = [f"--- {head('a')}", f"+++ {head('b')}", "config.ini:"]
    c = d["config"]
    lines += [f"  + {k} = {v}" for k, v in c["added"].items()] + [f"  - {k} = {v}" for k, v in c["removed"].items()]
    lines += [f"  ~ {k}: {x} -> {y}" for k, (x, y) in c["changed"].items()]
    if not any(c.values()):
        lines.append("  unchanged")
    kv = d["kv_scales"]
    lines.append(f"kv scales: {kv['changed']} values changed over {kv['compared']} (layer, head) pairs; "
                 f"max abs {kv['max_abs']:.6g}, max rel {kv['max_rel']:.6g}")
    lines += [f"  layer {t['layer']} head {t['head']} {t['param']}: {t['a']:.6g} -> {t['b']:.6g} "
              f"(abs {t['abs']:.3g}, rel {t['rel']:.3g})" for t in kv["top"]]
    w = d["weights"]
    lines.append(f"weights: {len(w['changed'])} changed, {len(w['unchanged'])} unchanged, "
                 f"{len(w['added'])} added, {len(w['removed'])} removed")
    lines += [f"  changed {p}" for p in w["changed"]] + [f"  added {p}" for p in w["added"]]
    lines += [f"  removed {p}" for p in w["removed"]]
    for path, tens in d.get("tensors", {}).items():
        for name, t in tens.items():
            stats = (f"max abs {t['max_abs']:.4g}, rel norm {t['rel_norm']:.4g}" if "max_abs" in t else t["status"])
            lines.append(f"  {path} {name}: {stats}")
    lines += [f"other file changed: {p}" for p in d["other_files_changed"]]
    p = d["provenance"]
    lines.append("provenance:" + ("" if any(p.values()) else " unchanged"))
    lines += [f"  + {k} = {v}" for k, v in p["added"].items()] + [f"  - {k} = {v}" for k, v in p["removed"].items()]
    lines += [f"  ~ {k}: {x} -> {y}" for k, (x, y) in p["changed"].items()]
    return "\n".join(lines)


def audit(reg, name: str) -> list[dict]:
    """One row per version of name, oldest first (by first appearance in the tag log)."""
    order: list[str] = []
    first_seen: dict[str, str] = {}
    for e in reg.log(name):
        if e.get("to") and e["to"] not in first_seen:
            first_seen[e["to"]] = e["when"]
            order.append(e["to"])
    present = set(reg.versions(name))
    order = [d for d in order if d in present] + sorted(present - set(order))
    if not order:
        raise RegistryError(f"{name}: no versions in {reg.url}")
    tags_now = reg.tags.list_tags(name)
    rows, prev, kv_cache = [], None, {}
    for digest in order:
        v = reg.load(name, digest)
        cfg, kv = _config(v.config), _kv(reg, v, kv_cache)
        layers = sorted({layer for layer, _ in kv})
        per_layer = {str(layer): {p: sum(kv[k][i] for k in kv if k[0] == layer) / sum(1 for k in kv if k[0] == layer)
                                  for i, p in enumerate(PARAMS) if p.endswith("scale")} for layer in layers}
        vals = {p: [row[i] for row in kv.values()] for i, p in enumerate(PARAMS)}
        rows.append({"digest": digest, "tags": sorted(t for t, d in tags_now.items() if d == digest),
                     "first_seen": first_seen.get(digest), "parent": v.parent,
                     "config_changes": _dict_diff(prev, cfg) if prev is not None else None,
                     "kv": {**{f"{p}_{f.__name__}": (f(vals[p]) if vals[p] else None)
                               for p in ("k_scale", "v_scale") for f in (min, max)},
                            **{f"{p}_mean": (sum(vals[p]) / len(vals[p]) if vals[p] else None)
                               for p in ("k_scale", "v_scale")},
                            "per_layer": per_layer}})
        prev = cfg
    return rows


def format_audit(rows: list[dict]) -> str:
    def num(x):
        return "-" if x is None else f"{x:.5g}"

    out = [f"{'VERSION':<19}  {'TAGS':<14}  {'FIRST SEEN':<24}  {'K MEAN':>8}  {'K MAX':>8}  "
           f"{'V MEAN':>8}  {'V MAX':>8}  CONFIG CHANGES"]
    for r in rows:
        c = r["config_changes"]
        if c is None:
            changes = "(first)"
        else:
            changes = ", ".join([f"{k}: {x}->{y}" for k, (x, y) in c["changed"].items()]
                                + [f"+{k}" for k in c["added"]] + [f"-{k}" for k in c["removed"]]) or "-"
        kv = r["kv"]
        out.append(f"{r['digest'][:19]:<19}  {','.join(r['tags']) or '-':<14}  {r['first_seen'] or '-':<24}  "
                   f"{num(kv['k_scale_mean']):>8}  {num(kv['k_scale_max']):>8}  {num(kv['v_scale_mean']):>8}  "
                   f"{num(kv['v_scale_max']):>8}  {changes}")
    return "\n".join(out)


def plot_audit(rows: list[dict], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise RegistryError("--plot needs matplotlib, which is not installed: pip install matplotlib") from None
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharex=True)
    for r in rows:
        layers = sorted(r["kv"]["per_layer"], key=int)
        label = f"{r['digest'][7:19]} {','.join(r['tags'])}".strip()
        for ax, param in zip(axes, ("k_scale", "v_scale")):
            ax.plot([int(x) for x in layers], [r["kv"]["per_layer"][x][param] for x in layers], marker="o", label=label)
    for ax, title in zip(axes, ("K scale (mean over heads)", "V scale (mean over heads)")):
        ax.set_title(title)
        ax.set_xlabel("layer")
    axes[0].legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
