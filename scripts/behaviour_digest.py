"""Digest of what short runs produce — R, AIP/AF/BWT, buffers, the pools the buffers were chosen from, and the
reconstructions — for every registered strategy in 2D and one 3D strategy. Run it before and after a change that must
not change behaviour: the two JSON files must be equal. Timings, paths and versions are left out (they legitimately differ).

    python scripts/behaviour_digest.py --out /tmp/before.json
"""
import argparse, hashlib, json, sys, tempfile
from pathlib import Path

import torch

def canon(r: dict) -> dict:
    keep = ('strategy', 'buffer', 'seed', 'person', 'T', 'R', 'AIP', 'AF', 'BWT', 'buffers', 'loss', 'metrics_unavailable', 'complete', 'protocol')
    return {k: r.get(k) for k in keep}

def digest_files(d: Path) -> dict:
    "sha256 of every tensor a run folder stores (model weights, memory, pools, reconstructions); metadata (timings) left out."
    from safetensors.torch import load_file
    out = {}
    for p in sorted(d.rglob('*.safetensors')):
        h = hashlib.sha256()
        for k, v in sorted(load_file(p).items()): h.update(k.encode()); h.update(v.contiguous().numpy().tobytes())
        out[str(p.relative_to(d))] = h.hexdigest()[:16]
    return out

def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument('--out', required=True)
    ap.add_argument('--T', type=int, default=3)
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    from facecl_nb.synth import default_demo_albums
    from facecl_nb.continual import RunConfig, continual_run
    try: from facecl_nb.strategies import known_strategies
    except ImportError: from facecl_nb.continual import known_strategies
    try: from facecl_nb.experiments import QUICK_OVERRIDES, albums_3d
    except ImportError: from facecl_nb.continual import QUICK_OVERRIDES, albums_3d
    album = default_demo_albums()[0]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [('demo', s, album) for s in known_strategies()]
        runs.append(('demo3d', 'hull', albums_3d(persons=[album.person], log=lambda *x: None)[0]))
        for profile, s, alb in runs:
            T = 2 if profile == 'demo3d' else a.T
            cfg = RunConfig.from_dict(dict(QUICK_OVERRIDES), strategy=s, buffer=2, seed=0, person=alb.person, profile=profile, T=T)
            d = Path(tmp)/f"{profile}-{s}"
            r = continual_run(alb, cfg, d, progress=False, log=lambda *x: None)
            c = canon(r)
            out[f"{profile}/{s}"] = {'results_sha256': hashlib.sha256(json.dumps(c, sort_keys=True).encode()).hexdigest(),
                                     'AIP': c['AIP'], 'buffers': [b['buffer'] for b in c['buffers']], 'state_files': digest_files(d)}
            print(profile, s, out[f"{profile}/{s}"]['results_sha256'][:16], flush=True)
    Path(a.out).write_text(json.dumps(out, indent=1, sort_keys=True))

if __name__ == '__main__': main()
