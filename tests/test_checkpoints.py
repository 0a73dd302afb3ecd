"""Checkpoints (facecl_nb.generators, facecl_nb.stylegan2): NVIDIA network pickles read without running anything
in them, and the project's own format.

The pickles here are written by a small stand-in for NVIDIA's `torch_utils.persistence` defined in this file
(independent of facecl's own `persistent_pickle_bytes`): every network and every layer is reduced to
`torch_utils.persistence._reconstruct_persistent_obj(meta)`, meta = {type: 'class', version: 6, module_src,
class_name, state}, state = the module's `__dict__` with `_init_args` / `_init_kwargs` (a `dnnlib.util.EasyDict`),
numpy scalar attributes, tensors through torch's own reduction — the layout of the official files. The fake
modules exist in `sys.modules` only while pickling.

If a checkout of NVIDIA's stylegan2-ada-pytorch is named by FACECL_STYLEGAN2_ADA_SRC, one more test pickles a
network with NVIDIA's own code (in a subprocess) and compares facecl's outputs with NVIDIA's.
Likewise FACECL_PSP_SRC (a checkout of yuval-alaluf/hyperstyle) cross-checks the pSp W encoder reader."""
import collections, copy, io, os, pickle, subprocess, sys, textwrap, types, zipfile
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from facecl_nb.generators import (GeneratorError, UnsafeCheckpointError, load_generator, save_generator, read_nvidia_pkl,
                                  PersistentRecord, persistent_pickle_bytes, get_arch, NVIDIA_CLASS_ARCH)
from facecl_nb.stylegan2 import StyleGAN2Generator, SynthesisLayer

SMALL = dict(z_dim=32, w_dim=48, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=2),
             synthesis_kwargs=dict(channel_base=1024, channel_max=64, num_fp16_res=0, conv_clamp=256))


# ---------------------------------------------------------------------------------------------- a persistence writer
@contextmanager
def fake_nvidia_modules():
    "`torch_utils.persistence` and `dnnlib.util` as importable names, only while pickling."
    pers, util = types.ModuleType('torch_utils.persistence'), types.ModuleType('dnnlib.util')

    def _reconstruct_persistent_obj(meta):
        raise AssertionError('the reader must never call the persistence reconstructor')
    _reconstruct_persistent_obj.__module__, _reconstruct_persistent_obj.__qualname__ = 'torch_utils.persistence', '_reconstruct_persistent_obj'
    pers._reconstruct_persistent_obj = _reconstruct_persistent_obj

    class EasyDict(dict):
        pass
    EasyDict.__module__, EasyDict.__qualname__ = 'dnnlib.util', 'EasyDict'
    util.EasyDict = EasyDict
    mods = {'torch_utils': types.ModuleType('torch_utils'), 'torch_utils.persistence': pers,
            'dnnlib': types.ModuleType('dnnlib'), 'dnnlib.util': util}
    assert not set(mods) & set(sys.modules)
    sys.modules.update(mods)
    try:
        yield pers, EasyDict
    finally:
        for k in mods: sys.modules.pop(k, None)


class Record:
    "Pickles as NVIDIA's persistent classes do: (_reconstruct_persistent_obj, (meta,))."
    def __init__(self, fn, meta): self.fn, self.meta = fn, meta
    def __reduce__(self): return self.fn, (self.meta,)


MODULE_SRC_TEMPLATE = "import os\nos.system('touch {marker}')\nopen({marker!r}, 'w').write('ran')\n"


def to_record(m, fn, EasyDict, src, class_name=None, init_args=(), init_kwargs=None):
    state = dict(m.__dict__); state.pop('_compiled_call_impl', None)
    for k, v in list(state.items()):
        if type(v) is float: state[k] = np.float64(v)                       # NVIDIA's gains are numpy scalars
    state['_modules'] = collections.OrderedDict(
        (k, None if sub is None else to_record(sub, fn, EasyDict, src, init_args=(1, 2)))   # layers record positional args too
        for k, sub in m._modules.items())
    state['_init_args'] = tuple(init_args)
    state['_init_kwargs'] = EasyDict(init_kwargs or {})
    name = class_name or {'StyleGAN2Generator': 'Generator'}.get(type(m).__name__, type(m).__name__)
    return Record(fn, dict(type='class', version=6, module_src=src, class_name=name, state=state))


def nvidia_like_pickle(path: Path, G_ema, G=None, init_kwargs=None, protocol=4, marker='/nonexistent/x', extra=None,
                       class_name=None) -> Path:
    "Write {G, D, G_ema, training_set_kwargs, augment_pipe} with the official record structure."
    src = MODULE_SRC_TEMPLATE.format(marker=str(marker))
    kw = init_kwargs if init_kwargs is not None else {k: v for k, v in G_ema.config()['kwargs'].items() if k != 'noise_mode'}
    D = nn.Module(); D.b4 = nn.Module(); D.b4.fc = nn.Linear(4, 1); D.img_resolution = 32
    pipe = nn.Module(); pipe.register_buffer('p', torch.zeros([])); pipe.xflip = 1.0
    with fake_nvidia_modules() as (pers, EasyDict):
        fn = pers._reconstruct_persistent_obj
        ek = EasyDict({k: EasyDict(v) if isinstance(v, dict) else v for k, v in kw.items()})
        data = {'G': to_record(G or G_ema, fn, EasyDict, src, class_name, init_kwargs=ek),
                'D': to_record(D, fn, EasyDict, src, 'Discriminator', init_kwargs={'c_dim': 0, 'img_resolution': 32}),
                'G_ema': to_record(G_ema, fn, EasyDict, src, class_name, init_kwargs=ek),
                'training_set_kwargs': EasyDict(path='ffhq.zip', resolution=32, use_labels=False),
                'augment_pipe': to_record(pipe, fn, EasyDict, src, 'AugmentPipe'), **(extra or {})}
        path.write_bytes(pickle.dumps(data, protocol=protocol))
    return path


def random_g(seed=0, **kw):
    "A small StyleGAN2 with every parameter and buffer non-trivial (noise strengths, w_avg, biases)."
    torch.manual_seed(seed)
    G = StyleGAN2Generator(**{**SMALL, **kw})
    with torch.no_grad():
        for n, p in G.named_parameters():
            if p.ndim <= 1: p.add_(torch.randn_like(p) * 0.3)
        G.mapping_network.w_avg.normal_()
    return G


def nothing_imported():
    return not any(m == 'torch_utils' or m.startswith(('torch_utils.', '_imported_module_', 'dnnlib')) for m in sys.modules)


# ------------------------------------------------------------------------------------------------------- round trips
@pytest.mark.parametrize('protocol', [2, 3, 4, 5])
@pytest.mark.parametrize('c_dim', [0, 3])
def test_official_layout_reads_back_bit_exactly(tmp_path, protocol, c_dim):
    marker = tmp_path / 'module_src_ran'
    G_ema, G = random_g(1, c_dim=c_dim), random_g(2, c_dim=c_dim)
    pk = nvidia_like_pickle(tmp_path / 'network-snapshot.pkl', G_ema, G, protocol=protocol, marker=marker)
    assert b'torch_utils.persistence' in pk.read_bytes() and b'_load_from_bytes' in pk.read_bytes()
    z = torch.randn(3, SMALL['z_dim'], generator=torch.Generator().manual_seed(5))
    c = torch.randn(3, c_dim) if c_dim else None
    for which, ref in (('G_ema', G_ema), ('G', G)):
        H = load_generator(pk, which=which)
        assert type(H) is StyleGAN2Generator and H.c_dim == c_dim and H.num_ws == ref.num_ws
        sd, sd_ref = H.state_dict(), ref.state_dict()
        assert list(sd) == list(sd_ref)
        for k in sd_ref: assert torch.equal(sd[k], sd_ref[k]), k
        assert H.load_report['missing'] == H.load_report['unexpected'] == H.load_report['mismatched'] == []
        assert H.load_report['class_name'] == 'Generator' and H.load_report['arch'] == 'stylegan2'
        with torch.no_grad():
            assert torch.equal(H.mapping(z, c, truncation_psi=0.7), ref.mapping(z, c, truncation_psi=0.7))
            assert torch.equal(H(z, c), ref(z, c))
    assert not marker.exists() and nothing_imported()
    data = read_nvidia_pkl(pk)
    assert sorted(data) == ['D', 'G', 'G_ema', 'augment_pipe', 'training_set_kwargs']
    rec = data['G_ema']
    assert isinstance(rec, PersistentRecord) and rec.version == 6 and 'os.system' in rec.module_src
    assert data['training_set_kwargs']['resolution'] == 32 and data['training_set_kwargs'].resolution == 32
    fc0 = rec.state['_modules']['mapping'].state['_modules']['fc0']
    assert fc0.class_name == 'FullyConnectedLayer' and isinstance(fc0.state['weight_gain'], np.floating)


def test_overrides_and_report(tmp_path):
    G = random_g(3)
    pk = nvidia_like_pickle(tmp_path / 'g.pkl', G)
    H = load_generator(pk, noise_mode='random')
    assert H.noise_mode == 'random' and H.load_report['init_kwargs']['synthesis_kwargs']['channel_max'] == 64
    # the project's own format keeps the overridden kwargs and weights
    save_generator(H, tmp_path / 'g.safetensors')
    H2 = load_generator(tmp_path / 'g.safetensors')
    assert H2.config() == H.config() and all(torch.equal(v, H2.state_dict()[k]) for k, v in H.state_dict().items())


def test_exported_writer_and_fresh_process(tmp_path):
    "facecl's own record writer reads back too, and a fresh interpreter finds the StyleGAN2 class without being told."
    G = random_g(4)
    (tmp_path / 'w.pkl').write_bytes(persistent_pickle_bytes({'G_ema': G}))
    save_generator(G, tmp_path / 'g.safetensors')
    z = torch.randn(2, SMALL['z_dim'], generator=torch.Generator().manual_seed(0))
    with torch.no_grad(): torch.save(G(z), tmp_path / 'ref.pt')
    torch.save(z, tmp_path / 'z.pt')
    code = textwrap.dedent(f"""
        import sys, torch
        from facecl_nb.generators import load_generator
        assert 'facecl_nb.stylegan2' not in sys.modules
        z, ref = torch.load({str(tmp_path / 'z.pt')!r}), torch.load({str(tmp_path / 'ref.pt')!r})
        for name in ('w.pkl', 'g.safetensors'):
            G = load_generator({str(tmp_path)!r} + '/' + name)
            with torch.no_grad(): assert torch.equal(G(z), ref), name
            print(name, type(G).__name__)
        assert not any(m.startswith(('torch_utils', '_imported_module_', 'dnnlib')) for m in sys.modules)
    """)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert 'w.pkl StyleGAN2Generator' in r.stdout and 'g.safetensors StyleGAN2Generator' in r.stdout


# --------------------------------------------------------------------------------------------------------- refusals
class Evil:
    def __init__(self, f, *args): self.f, self.args = f, args
    def __reduce__(self): return self.f, self.args


def payloads(marker: Path):
    import builtins, importlib, posix, runpy, shutil
    m = str(marker)
    return {
        'os.system': Evil(os.system, f'touch {m}'),
        'posix.system': Evil(posix.system, f'touch {m}'),
        'builtins.eval': Evil(builtins.eval, f'open({m!r}, "w")'),
        'builtins.exec': Evil(builtins.exec, f'open({m!r}, "w")'),
        'builtins.__import__': Evil(builtins.__import__, 'antigravity'),
        'builtins.getattr': Evil(getattr, Evil(importlib.import_module, 'os'), 'system'),
        'builtins.open': Evil(open, m, 'w'),
        'subprocess.Popen': Evil(subprocess.Popen, ['touch', m]),
        'subprocess.check_output': Evil(subprocess.check_output, ['touch', m]),
        'importlib.import_module': Evil(importlib.import_module, 'antigravity'),
        'runpy.run_path': Evil(runpy.run_path, m),
        'shutil.rmtree': Evil(shutil.rmtree, str(marker.parent / 'nothing')),
        'torch.load': Evil(torch.load, m),
        'numpy.load': Evil(np.load, m),
        'pickle.loads': Evil(pickle.loads, pickle.dumps(Evil(os.system, f'touch {m}'))),
        'copyreg._reconstructor+Popen': Evil(__import__('copyreg')._reconstructor, subprocess.Popen, object, None),
    }


@pytest.mark.parametrize('name', list(payloads(Path('/x'))))
@pytest.mark.parametrize('where', ['top', 'nested'])
def test_payloads_are_refused_before_running(tmp_path, name, where):
    marker = tmp_path / 'pwned'
    payload = payloads(marker)[name]
    pk = tmp_path / 'evil.pkl'
    if where == 'top':
        pk.write_bytes(pickle.dumps({'G_ema': payload, 'G': payload}))
    else:   # deep inside a layer's state, after real tensors were read
        G = random_g(0)
        G.synthesis_network.b32.conv1.__dict__['evil'] = payload
        nvidia_like_pickle(pk, G)
    for call in (lambda: load_generator(pk), lambda: read_nvidia_pkl(pk)):
        with pytest.raises(UnsafeCheckpointError) as e:
            call()
        msg = str(e.value)
        assert str(pk) in msg and 'refused to load global' in msg and 'nothing in the file was run' in msg
        refused = msg.split("global '")[1].split("'")[0]
        assert refused and not refused.startswith(('torch._utils', 'torch.storage', 'collections', 'numpy._core', 'copyreg')), refused
    assert not marker.exists() and nothing_imported()


def test_payload_in_storage_bytes_is_refused(tmp_path):
    "A 'storage' whose bytes are a malicious pickle: torch.load(weights_only=True) refuses it, reported as unsafe."
    marker = tmp_path / 'pwned'
    evil_bytes = pickle.dumps(Evil(os.system, f'touch {marker}'), protocol=2)
    pk = tmp_path / 'storage.pkl'
    pk.write_bytes(pickle.dumps({'G_ema': Evil(torch.storage._load_from_bytes, evil_bytes)}))
    with pytest.raises(UnsafeCheckpointError, match=r"storage\.pkl: refused to load global 'posix\.system' inside a tensor storage"):
        load_generator(pk)
    assert not marker.exists()


def test_dotted_names_and_other_persistence_functions_are_refused(tmp_path):
    "Protocol-4 dotted names (object.__subclasses__) and persistence internals other than the reconstructor."
    for module, name in [('builtins', 'object.__subclasses__'), ('torch_utils.persistence', '_src_to_module'),
                         ('collections', 'os'), ('torch', 'load'), ('torch.serialization', 'load'), ('numpy', 'load')]:
        raw = b'\x80\x04' + b'\x8c' + bytes([len(module)]) + module.encode() + b'\x8c' + bytes([len(name)]) + name.encode() + b'\x93.'
        pk = tmp_path / 'g.pkl'; pk.write_bytes(raw)
        with pytest.raises(UnsafeCheckpointError, match=f"refused to load global '{module}.{name}'"):
            read_nvidia_pkl(pk)


def test_generated_module_classes_are_inert(tmp_path):
    "A global from a generated module (`_imported_module_*`) becomes an inert stand-in: calling it runs nothing."
    marker = tmp_path / 'pwned'
    mod = types.ModuleType('_imported_module_0123')
    def system(cmd): os.system(cmd)
    system.__module__, system.__qualname__ = '_imported_module_0123', 'system'; mod.system = system
    sys.modules['_imported_module_0123'] = mod
    try: raw = pickle.dumps({'G_ema': Evil(system, f'touch {marker}')})
    finally: del sys.modules['_imported_module_0123']
    pk = tmp_path / 'g.pkl'; pk.write_bytes(raw)
    with pytest.raises(GeneratorError, match=r"network 'G_ema' is a system; facecl has no architecture"):
        load_generator(pk)
    assert not marker.exists() and nothing_imported()


def test_record_with_other_type_is_refused(tmp_path):
    with fake_nvidia_modules() as (pers, EasyDict):
        raw = pickle.dumps({'G_ema': Record(pers._reconstruct_persistent_obj, dict(type='function', version=6, module_src='', class_name='f', state={}))})
    pk = tmp_path / 'g.pkl'; pk.write_bytes(raw)
    with pytest.raises(UnsafeCheckpointError, match='only class records are read'):
        load_generator(pk)


# ------------------------------------------------------------------------------------------------ bad or other files
def test_truncated_and_non_pickle_files(tmp_path):
    pk = nvidia_like_pickle(tmp_path / 'full.pkl', random_g(0))
    raw = pk.read_bytes()
    for n in (3, 100, len(raw) // 2, len(raw) - 1):
        p = tmp_path / f'trunc_{n}.pkl'; p.write_bytes(raw[:n])
        with pytest.raises(GeneratorError, match=rf"trunc_{n}\.pkl: could not read the pickle .*truncated or corrupt"):
            load_generator(p)
    for name, content, msg in [('empty.pkl', b'', 'not a pickle file'), ('text.pkl', b'hello world', 'not a pickle file'),
                               ('json.pkl', b'{"G_ema": 1}', 'not a pickle file')]:
        p = tmp_path / name; p.write_bytes(content)
        with pytest.raises(GeneratorError, match=rf"{name.replace('.', '[.]')}: {msg}"):
            load_generator(p)
    p = tmp_path / 'saved.pkl'; torch.save({'w': torch.ones(2)}, p)
    with pytest.raises(GeneratorError, match=r"saved\.pkl: a zip archive"):
        load_generator(p)
    p = tmp_path / 'list.pkl'; p.write_bytes(pickle.dumps([1, 2]))
    with pytest.raises(GeneratorError, match=r"list\.pkl: expected a dict of networks, got list"):
        load_generator(p)
    with pytest.raises(FileNotFoundError, match='missing.pkl: generator checkpoint not found'):
        load_generator(tmp_path / 'missing.pkl')


def test_other_networks_and_architectures(tmp_path):
    G = random_g(0)
    pk = nvidia_like_pickle(tmp_path / 'g.pkl', G)
    with pytest.raises(GeneratorError, match=r"g\.pkl: network 'D' is a Discriminator; facecl has no architecture"):
        load_generator(pk, which='D')
    with pytest.raises(GeneratorError, match=r"g\.pkl: no network 'G_emma' \(has: \['D', 'G', 'G_ema'"):
        load_generator(pk, which='G_emma')
    # StyleGAN3 pickles also call their network 'Generator'; its SynthesisInput layer tells them apart
    sg3 = nn.Module(); sg3.synthesis = nn.Module(); sg3.synthesis.input = nn.Linear(2, 2)
    sg3.synthesis.input.__class__ = type('SynthesisInput', (nn.Linear,), {})
    pk3 = nvidia_like_pickle(tmp_path / 'sg3.pkl', sg3, class_name='Generator', init_kwargs={'z_dim': 512})
    with pytest.raises(GeneratorError, match=r"sg3\.pkl: network 'G_ema' is a Generator \(stylegan3\), which facecl cannot build"):
        load_generator(pk3)
    try:
        get_arch('eg3d'); eg3d = True
    except GeneratorError:
        eg3d = False
    if not eg3d:
        pk4 = nvidia_like_pickle(tmp_path / 'eg3d.pkl', G, class_name='TriPlaneGenerator')
        with pytest.raises(GeneratorError, match=r"eg3d\.pkl: network 'G_ema' is a TriPlaneGenerator \(eg3d\), which facecl cannot build"):
            load_generator(pk4)


def test_wrong_shapes_and_keys(tmp_path):
    G = random_g(0)
    pk = nvidia_like_pickle(tmp_path / 'g.pkl', G)
    narrow = dict(SMALL['synthesis_kwargs'], channel_max=32)
    with pytest.raises(GeneratorError) as e:
        load_generator(pk, synthesis_kwargs=narrow)
    msg = str(e.value)
    assert "g.pkl: network 'G_ema' (Generator) does not match architecture 'stylegan2': wrong shape [" in msg
    assert 'synthesis.b4.const (file [64, 4, 4], model [32, 4, 4])' in msg
    H = load_generator(pk, synthesis_kwargs=narrow, strict=False)
    assert 'synthesis.b4.const' in H.load_report['mismatched'] and H.load_report['missing'] == []
    assert torch.equal(H.state_dict()['mapping.fc0.weight'], G.state_dict()['mapping.fc0.weight'])   # what fits is loaded
    # a larger model: the extra blocks are missing; a smaller: the file's blocks are unexpected
    with pytest.raises(GeneratorError, match=r"missing \[synthesis\.b64\.resample_filter, synthesis\.b64\.conv0"):
        load_generator(pk, img_resolution=64)
    with pytest.raises(GeneratorError, match=r"unexpected \[synthesis\.b32\.resample_filter"):
        load_generator(pk, img_resolution=16)
    H = load_generator(pk, img_resolution=64, strict=False)
    assert any(k.startswith('synthesis.b64.') for k in H.load_report['missing'])
    # a network of another architecture saved under the name 'Generator'
    other = nn.Module(); other.net = nn.Linear(3, 3)
    pk2 = nvidia_like_pickle(tmp_path / 'other.pkl', other, class_name='Generator', init_kwargs=dict(SMALL))
    with pytest.raises(GeneratorError, match=r"other\.pkl: .*missing \[synthesis\.b4\.const.*unexpected \[net\.weight, net\.bias\]"):
        load_generator(pk2)
    # recorded constructor arguments this implementation does not know
    pk3 = nvidia_like_pickle(tmp_path / 'kw.pkl', G, init_kwargs={**SMALL, 'mapping_kwargs': {'num_layers': 2, 'magic': 1}})
    with pytest.raises(GeneratorError, match=r"kw\.pkl: network 'G_ema' \(Generator\) was built with arguments facecl's 'stylegan2' does not accept: .*magic"):
        load_generator(pk3)


def test_safetensors_errors(tmp_path):
    G = random_g(0)
    save_generator(G, tmp_path / 'g.safetensors')
    with pytest.raises(GeneratorError, match=r"g\.safetensors does not match architecture 'stylegan2': missing \[synthesis\.b64"):
        load_generator(tmp_path / 'g.safetensors', img_resolution=64)
    (tmp_path / 'bad.safetensors').write_bytes(b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1}')
    with pytest.raises(GeneratorError, match=r"bad\.safetensors"):
        load_generator(tmp_path / 'bad.safetensors')


# ------------------------------------------------------------------------------ against NVIDIA's own code (opt-in)
NV_SRC = os.environ.get('FACECL_STYLEGAN2_ADA_SRC')


@pytest.mark.skipif(not NV_SRC, reason='set FACECL_STYLEGAN2_ADA_SRC to a checkout of NVlabs/stylegan2-ada-pytorch')
@pytest.mark.parametrize('arch', ['skip', 'resnet'])
def test_matches_nvidia_code(tmp_path, arch):
    "NVIDIA's networks.py builds, pickles (its own persistence) and runs a network; facecl reads and runs the same."
    code = textwrap.dedent(f"""
        import sys, pickle, warnings, torch
        warnings.filterwarnings('ignore')
        sys.path.insert(0, {NV_SRC!r})
        from training.networks import Generator
        torch.manual_seed(0)
        G = Generator(z_dim=32, c_dim=4, w_dim=48, img_resolution=32, img_channels=3, mapping_kwargs=dict(num_layers=3),
                      synthesis_kwargs=dict(channel_base=512, channel_max=32, num_fp16_res=2, conv_clamp=256, architecture={arch!r})).eval()
        with torch.no_grad():
            for n, p in G.named_parameters():
                if 'noise_strength' in n: p.fill_(0.3)
                elif p.ndim <= 1: p.add_(torch.randn_like(p) * 0.2)
            G.mapping.w_avg.normal_()
        z, c = torch.randn(3, 32), torch.randn(3, 4)
        with torch.no_grad(): img = G(z, c, truncation_psi=0.8, noise_mode='const', force_fp32=True)
        with open({str(tmp_path / 'nv.pkl')!r}, 'wb') as f: pickle.dump(dict(G=G, G_ema=G, D=None, training_set_kwargs={{}}, augment_pipe=None), f)
        torch.save(dict(z=z, c=c, img=img), {str(tmp_path / 'ref.pt')!r})
    """)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = torch.load(tmp_path / 'ref.pt')
    G = load_generator(tmp_path / 'nv.pkl')
    assert G.load_report['missing'] == G.load_report['unexpected'] == []
    with torch.no_grad():
        img = G.synthesis(G.mapping(ref['z'], ref['c'], truncation_psi=0.8))
    assert img.shape == ref['img'].shape
    assert (img - ref['img']).abs().max() < 1e-4 * ref['img'].abs().max()
    assert nothing_imported()


# ------------------------------------------------------------------------------ EG3D against NVIDIA's own code (opt-in)
EG3D_SRC = os.environ.get('FACECL_EG3D_SRC')


@pytest.mark.skipif(not EG3D_SRC, reason="set FACECL_EG3D_SRC to the eg3d/ folder of a checkout of NVlabs/eg3d")
@pytest.mark.parametrize('sr', ['SuperresolutionHybrid2X', 'SuperresolutionHybrid4X', 'SuperresolutionHybrid8XDC'])
def test_eg3d_matches_nvidia_code(tmp_path, sr):
    """NVIDIA's TriPlaneGenerator builds, pickles and renders (its random sample placement made deterministic the way
    ours is: stratified samples at bin centres, importance samples at evenly spaced quantiles); facecl reads the pickle
    with the safe reader and renders the same image, raw image and depth."""
    res = {'SuperresolutionHybrid2X': 128, 'SuperresolutionHybrid4X': 256, 'SuperresolutionHybrid8XDC': 512}[sr]
    code = textwrap.dedent(f"""
        import sys, pickle, warnings, functools, torch
        warnings.filterwarnings('ignore')
        sys.path.insert(0, {EG3D_SRC!r})
        from training.triplane import TriPlaneGenerator
        import training.volumetric_rendering.renderer as R
        torch.rand_like = lambda x, **k: torch.full_like(x, 0.5)               # stratified samples at bin centres
        R.ImportanceRenderer.sample_pdf = functools.partialmethod(R.ImportanceRenderer.sample_pdf, det=True)
        rk = dict(image_resolution={res}, disparity_space_sampling=False, clamp_mode='softplus',
                  superresolution_module='training.superresolution.{sr}', c_gen_conditioning_zero=False, gpc_reg_prob=0.5,
                  c_scale=1.0, superresolution_noise_mode='none', density_reg=0.25, density_reg_p_dist=0.004, reg_type='l1',
                  decoder_lr_mul=1.0, sr_antialias=True, depth_resolution=8, depth_resolution_importance=8, ray_start=2.25,
                  ray_end=3.3, box_warp=1, avg_camera_radius=2.7, avg_camera_pivot=[0, 0, 0.2])
        torch.manual_seed(0)
        G = TriPlaneGenerator(z_dim=16, c_dim=25, w_dim=512, img_resolution={res}, img_channels=3, sr_num_fp16_res=0,
                              mapping_kwargs=dict(num_layers=2), rendering_kwargs=rk,
                              sr_kwargs=dict(channel_base=1024, channel_max=32, fused_modconv_default='inference_only'),
                              channel_base=1024, channel_max=32, num_fp16_res=0, conv_clamp=None, fused_modconv_default='inference_only').eval()
        G.neural_rendering_resolution = 16
        with torch.no_grad():
            for n, p in G.named_parameters():
                if 'noise_strength' in n: p.fill_(0.3)
                elif p.ndim <= 1: p.add_(torch.randn_like(p) * 0.2)
            G.backbone.mapping.w_avg.normal_()
        z = torch.randn(2, 16)
        ang = torch.tensor([0.0, 0.3])
        c = torch.zeros(2, 25)
        for i, a in enumerate(ang):
            m = torch.eye(4); ca, sa = torch.cos(a), torch.sin(a)
            m[:3, :3] = torch.tensor([[ca, 0, -sa], [0, -1, 0], [-sa, 0, -ca]])
            m[:3, 3] = torch.tensor([2.7 * sa, 0, 2.7 * ca + 0.2])
            c[i, :16] = m.flatten(); c[i, 16:] = torch.tensor([4.2647, 0, 0.5, 0, 4.2647, 0.5, 0, 0, 1])
        with torch.no_grad():
            ws = G.mapping(z, c, truncation_psi=0.7)
            out = G.synthesis(ws, c, noise_mode='const')
        with open({str(tmp_path / 'nv.pkl')!r}, 'wb') as f: pickle.dump(dict(G_ema=G), f)
        torch.save(dict(z=z, c=c, ws=ws, **out), {str(tmp_path / 'ref.pt')!r})
    """)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = torch.load(tmp_path / 'ref.pt')
    G = load_generator(tmp_path / 'nv.pkl')
    assert G.load_report['missing'] == G.load_report['unexpected'] == G.load_report['mismatched'] == []
    assert G.neural_rendering_resolution == 16
    with torch.no_grad():
        ws = G.mapping(ref['z'], ref['c'], truncation_psi=0.7)
        out = G.render(ws, ref['c'])
    assert (ws - ref['ws']).abs().max() < 1e-4 * ref['ws'].abs().max()
    for k in ('image_raw', 'image_depth', 'image'):
        assert out[k].shape == ref[k].shape, k
        err = (out[k] - ref[k]).abs().max() / ref[k].abs().max()
        assert err < 1e-4, (k, float(err))
    assert nothing_imported()



@pytest.mark.skipif(not EG3D_SRC, reason="set FACECL_EG3D_SRC to the eg3d/ folder of a checkout of NVlabs/eg3d")
@pytest.mark.parametrize('freeze', [0, 22])
def test_dual_discriminator_matches_nvidia_code(tmp_path, freeze):
    """NVIDIA's DualDiscriminator (64 px, small channels, camera mapping, biases moved off zero) builds, pickles and scores
    photos with their raw renders; facecl reads the pickle with the safe reader (FreezeD as an override) and gives the
    same logits, and with FreezeD 22 the same ones from the same weights."""
    code = textwrap.dedent(f"""
        import sys, pickle, warnings, torch
        warnings.filterwarnings('ignore')
        sys.path.insert(0, {EG3D_SRC!r})
        from training.dual_discriminator import DualDiscriminator
        torch.manual_seed(0)
        D = DualDiscriminator(c_dim=25, img_resolution=64, img_channels=3, channel_base=1024, channel_max=32, num_fp16_res=0,
                              conv_clamp=None, mapping_kwargs=dict(num_layers=2), epilogue_kwargs=dict(mbstd_group_size=2)).eval()
        with torch.no_grad():
            for n, p in D.named_parameters():
                if p.ndim <= 1: p.add_(torch.randn_like(p) * 0.2)
        img = dict(image=torch.randn(4, 3, 64, 64).clamp(-1, 1), image_raw=torch.randn(4, 3, 32, 32).clamp(-1, 1))
        c = torch.randn(4, 25)
        with torch.no_grad(): logits = D(img, c)
        with open({str(tmp_path / 'nv.pkl')!r}, 'wb') as f: pickle.dump(dict(D=D), f)
        torch.save(dict(c=c, logits=logits, **img), {str(tmp_path / 'ref.pt')!r})
    """)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = torch.load(tmp_path / 'ref.pt')
    from facecl_nb.dual_discriminator import load_nvidia_discriminator
    D = load_nvidia_discriminator(tmp_path / 'nv.pkl', block_kwargs={'freeze_layers': freeze})
    assert D.load_report['missing'] == D.load_report['unexpected'] == D.load_report['mismatched'] == []
    with torch.no_grad(): logits = D({'image': ref['image'], 'image_raw': ref['image_raw']}, ref['c'])
    assert logits.shape == ref['logits'].shape
    err = (logits - ref['logits']).abs().max() / ref['logits'].abs().max()
    assert err < 1e-4, float(err)
    assert nothing_imported()

# ------------------------------------------------------------------------------ pSp W encoder against the original code (opt-in)
PSP_SRC = os.environ.get('FACECL_PSP_SRC')

# CPU stand-ins for rosinality's CUDA ops (`models/stylegan2/op`, compiled at import): the reference formulas of
# stylegan2-pytorch. The W encoder only runs `EqualLinear` without activation, so none of them is called here.
PSP_OP_STUBS = """
    import math, sys, types, torch
    import torch.nn.functional as F
    def fused_leaky_relu(input, bias, negative_slope=0.2, scale=2 ** 0.5):
        return F.leaky_relu(input + bias.view(1, -1, *[1] * (input.ndim - 2)), negative_slope) * scale
    class FusedLeakyReLU(torch.nn.Module):
        def __init__(self, channel, negative_slope=0.2, scale=2 ** 0.5):
            super().__init__()
            self.bias, self.negative_slope, self.scale = torch.nn.Parameter(torch.zeros(channel)), negative_slope, scale
        def forward(self, input): return fused_leaky_relu(input, self.bias, self.negative_slope, self.scale)
    def upfirdn2d(input, kernel, up=1, down=1, pad=(0, 0)):
        n, c, h, w = input.shape
        x = input.reshape(n * c, 1, h, 1, w, 1)
        x = F.pad(x, [0, up - 1, 0, 0, 0, up - 1]).reshape(n * c, 1, h * up, w * up)
        x = F.pad(x, [pad[0], pad[1], pad[0], pad[1]])                        # negative pads crop
        x = F.conv2d(x, torch.flip(kernel, [0, 1])[None, None].to(x))
        x = x[:, :, ::down, ::down]
        return x.reshape(n, c, x.shape[-2], x.shape[-1])
    op = types.ModuleType('models.stylegan2.op')
    op.fused_leaky_relu, op.FusedLeakyReLU, op.upfirdn2d = fused_leaky_relu, FusedLeakyReLU, upfirdn2d
    sys.modules['models.stylegan2.op'] = op
"""


@pytest.mark.skipif(not PSP_SRC, reason='set FACECL_PSP_SRC to a checkout of yuval-alaluf/hyperstyle (models/encoders/w_encoder.py)')
def test_psp_w_encoder_matches_original(tmp_path):
    """HyperStyle's own `WEncoder(50, 'ir_se')` (its CUDA op package replaced by CPU stand-ins, in a subprocess) is
    randomized — BatchNorm statistics and affines, PReLU slopes and the linear bias too — and saved the way pSp/e4e's
    trainer saves a checkpoint; `load_psp_w_encoder` reads it and gives the same output (`E(x)`), the same codes
    (`encode`: output + latent_avg) and, for a 1024-px photo, the codes of the MyStyle preprocessing (bicubic to 256,
    clamp) fed to the original."""
    code = textwrap.dedent(PSP_OP_STUBS) + textwrap.dedent(f"""
        import warnings, contextlib, io
        warnings.filterwarnings('ignore')
        sys.path.insert(0, {PSP_SRC!r})
        from models.encoders.w_encoder import WEncoder
        torch.manual_seed(0)
        with contextlib.redirect_stdout(io.StringIO()):                      # it prints 'Using WEncoder'
            E = WEncoder(50, 'ir_se', types.SimpleNamespace(input_nc=3, output_size=1024)).eval()
        with torch.no_grad():
            for m in E.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5); m.bias.normal_(0, 0.1)
                    m.running_mean.normal_(0, 0.1); m.running_var.uniform_(0.5, 1.5)
                elif isinstance(m, torch.nn.PReLU): m.weight.uniform_(0.0, 0.5)
            E.linear.bias.normal_(0, 0.1)                                     # small: the output is mostly the body's
        latent_avg = torch.randn(18, 512)
        opts = dict(exp_dir='experiment', dataset_type='ffhq_encode', encoder_type='WEncoder', input_nc=3, label_nc=0,
                    output_size=1024, batch_size=8, learning_rate=1e-4, optim_name='ranger', start_from_latent_avg=True,
                    learn_in_w=False, lpips_lambda=0.8, id_lambda=0.1, l2_lambda=1.0, w_norm_lambda=0,
                    stylegan_weights='pretrained_models/stylegan2-ffhq-config-f.pt', checkpoint_path=None, max_steps=500000)
        state_dict = {{'encoder.' + k: v for k, v in E.state_dict().items()}}
        state_dict['decoder.style.1.weight'] = torch.randn(512, 512)           # a trainer's net also holds the decoder
        torch.save({{'state_dict': state_dict, 'opts': opts, 'latent_avg': latent_avg}}, {str(tmp_path / 'w_encoder.pt')!r})
        torch.manual_seed(1)
        x = torch.rand(2, 3, 256, 256) * 2 - 1
        x1024 = torch.rand(2, 3, 1024, 1024) * 2 - 1
        with torch.no_grad():
            out = E(x)
            out1024 = E(F.interpolate(x1024, size=256, mode='bicubic', align_corners=False).clamp(-1, 1))
        torch.save(dict(x=x, x1024=x1024, out=out, out1024=out1024, latent_avg=latent_avg), {str(tmp_path / 'ref.pt')!r})
    """)
    r = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    ref = torch.load(tmp_path / 'ref.pt')
    from facecl_nb.encoders import PSPWEncoder, load_psp_w_encoder
    E = load_psp_w_encoder(tmp_path / 'w_encoder.pt')
    assert isinstance(E, PSPWEncoder) and (E.num_ws, E.w_dim) == (18, 512) and E.start_from_latent_avg
    assert E.load_report == {'missing': [], 'unexpected': [], 'mismatched': []}
    assert list(E.config()['kwargs']['units']) == [3, 4, 14, 3]
    assert ref['out'].shape == (2, 18, 512) and torch.isfinite(ref['out']).all() and ref['out'].std() > 0

    scale = ref['out'].abs().max()                                           # the encoder's own output, latent_avg aside

    def rel_err(a, b):
        assert a.shape == b.shape, (a.shape, b.shape)
        return float((a - b).abs().max() / scale)
    with torch.no_grad(): out = E(ref['x'])
    assert rel_err(out, ref['out']) < 1e-4
    codes = E.encode(ref['x'])
    assert rel_err(codes, ref['out'] + ref['latent_avg']) < 1e-4
    codes1024 = E.encode(ref['x1024'])
    assert rel_err(codes1024, ref['out1024'] + ref['latent_avg']) < 1e-4
    assert not any(m == 'models' or m.startswith('models.') for m in sys.modules)
