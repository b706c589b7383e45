"""diffusers integration: run the attention core of diffusers models and pipelines on attnlib.

``apply(model_or_pipeline, method="flash", backend="auto", **method_options)`` switches every
attention module of a diffusers model (or of each ``transformer*`` / ``unet*`` component of a
pipeline) and returns how many it switched; ``remove(model_or_pipeline)`` switches them back.

How (diffusers 0.42): each attention module keeps its own processor *object*, so projections,
norms, rotary embeddings, Flux's joint text/image attention and Wan's cross-attention all run
unchanged; only the attention core moves. Patching is at class and instance level, in the style
of Liger's ``monkey_patch`` (STYLE habit 11); no diffusers or torch module is modified:

* class level: for each processor class, apply() builds a subclass whose ``__call__`` is the
  original function's code bound to a copy of its module's globals (registered in sys.modules
  as a shadow module, because torch.compile looks globals up there), in which the one name the
  processor calls attention through is rebound to an attnlib router: ``dispatch_attention_fn``
  (every ``AttentionModuleMixin`` processor: Wan, Flux, ...) or ``F`` (legacy ``Attention``
  processors of UNets and VAEs, which call ``F.scaled_dot_product_attention``). Module-level
  functions of the processor's module through which ``__call__`` reaches that name (Flux2's
  KV-cache processors attend in ``_flux2_kv_causal_attention``) are copied onto the same globals,
  so their calls are routed too. Code and
  signature are the original's, so diffusers' kwarg filtering (by ``inspect.signature``) and
  everything else the processor does are unchanged. The copy is taken at apply() time;
* instance level: each processor's ``__class__`` is set to that subclass (identity, attributes
  and, for ``nn.Module`` processors, weights stay; ``processor.__class__`` still reads as the
  original class, which diffusers' class checks test, ``type(processor)`` gives the subclass);
  remove() sets the original class back and drops shadow modules no processor uses any more.
  Each attention module whose processor is switched gets a subclass too, whose only change is
  ``set_processor``: replacing the processor (diffusers' ``set_attn_processor``) undoes apply()
  for that module, as remove() would. Setting the processor a module already has changes
  nothing, so ``model.set_attn_processor(saved)`` with processors saved *before* apply()
  (``saved = model.attn_processors``) does not undo it:
  apply() switches the processor objects in place, so the saved processors are the switched
  ones, and that call cannot be told from the round trip diffusers' PAG pipelines make around
  every call (``original_attn_proc = unet.attn_processors``, PAG processors assigned to a few
  modules, then ``unet.set_attn_processor(original_attn_proc)``), which must leave the model on
  attnlib. Switching copies instead would tell them apart, but attributes set through
  ``model.attn_processors`` after apply() (``set_ip_adapter_scale`` sets each processor's
  ``scale``) would then land on the copies and be lost at remove(). Undo apply() with remove(),
  or set new processor objects;
* the subclasses are made at run time, so pickle cannot find them by name: their
  ``__reduce_ex__`` stores the original class (and the route) and makes the subclass again on
  load, so ``torch.save(model)`` / ``torch.load`` and ``copy.deepcopy`` keep the model on attnlib.

Processors of the same class that were not switched (another model) keep running natively.
Diffusers' own attention-backend registry is keyed by a closed Enum (``AttentionBackendName``)
and is process-wide, so it cannot carry per-model attnlib methods and options; it is left alone,
and a backend the user set with ``set_attention_backend`` still serves the calls attnlib leaves
to diffusers (an attention mask other than a key mask, context parallelism, extra attention
kwargs, dropout, and anything else attnlib cannot compute exactly, such as a zero or negative
scale). A key mask (HunyuanVideo's (B, 1, 1, N) padded prompt, LTX-Video's and Sana's (B, Hq, 1,
N), or diffusers' 2-D (B, N) form) runs on attnlib's flash kernels as ``key_mask``
(attnlib/key_mask.py) with method flash.
"""
from __future__ import annotations

import inspect
import logging
import re
import sys
import threading
import types
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from .. import dispatch
from ..key_mask import key_only_mask
from ..options import check_method_options
from . import sdpa as _sdpa

log = logging.getLogger("attnlib")

# diffusers (major, minor) versions whose processor/dispatch layout this module was written against
SUPPORTED_VERSIONS = ((0, 42),)
# the methods that patch_sdpa accepts: block_sparse needs a per-shape mask, asymrnr has no SDPA form
METHODS = _sdpa.PATCHABLE_METHODS
# components of a pipeline that are switched
COMPONENT_PREFIXES = ("transformer", "unet")

_DISPATCH_NAME = "dispatch_attention_fn"
_DISPATCH_PARAMS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa",
                    "attention_kwargs", "backend", "parallel_config")


@dataclass(frozen=True, eq=False)
class _Route:
    method: str
    backend: str
    options: dict = field(default_factory=dict)


_lock = threading.Lock()
_logged: set[str] = set()


def _log_once(msg: str, *args) -> None:
    if torch.compiler.is_compiling():  # dynamo cannot trace logging (fullgraph would fail on it)
        return
    key = msg % args
    if key not in _logged:
        _logged.add(key)
        log.info(msg, *args)


# --------------------------------------------------------------------------- version gate

def _diffusers():
    """The imported diffusers package, after checking its version is one this module handles."""
    try:
        import diffusers
    except ImportError as e:  # pragma: no cover - exercised only without diffusers
        raise ImportError("attnlib.integrations.diffusers needs the diffusers package "
                          "(pip install 'diffusers==0.42.*')") from e
    version = getattr(diffusers, "__version__", "unknown")
    m = re.match(r"(\d+)\.(\d+)", version)
    if m is None or (int(m.group(1)), int(m.group(2))) not in SUPPORTED_VERSIONS:
        supported = ", ".join(f"{a}.{b}.x" for a, b in SUPPORTED_VERSIONS)
        raise RuntimeError(f"attnlib.integrations.diffusers supports diffusers {supported}, found {version}: "
                           "its attention processors and dispatch_attention_fn were not checked against this "
                           "version. Install a supported diffusers, or use attnlib.patch_sdpa(...) around the "
                           "model call instead (covers diffusers' native backend only).")
    from diffusers.models import attention_dispatch
    params = tuple(inspect.signature(attention_dispatch.dispatch_attention_fn).parameters)
    if params != _DISPATCH_PARAMS:  # same minor version, changed layout: refuse rather than misroute
        raise RuntimeError(f"diffusers {version}: dispatch_attention_fn has parameters {params}, "
                           f"attnlib expects {_DISPATCH_PARAMS}")
    return diffusers


# --------------------------------------------------------------------------- routers

def _to_attnlib(route: _Route, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa,
                fallback: Callable | None = None, fallback_name: str = "torch"):
    # route's method, backend and options were checked by apply(); torch (or the given fallback)
    # serves what attnlib cannot serve exactly
    return _sdpa._route(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, route.method,
                        route.backend, route.options, fallback, fallback_name)


def _dispatch_router(original: Callable, route: _Route) -> Callable:
    """dispatch_attention_fn with diffusers' signature; q/k/v are (batch, seq, heads, head_dim)."""

    def dispatch_attention_fn(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                              enable_gqa=False, attention_kwargs=None, *, backend=None, parallel_config=None):
        reason = None
        mask = _key_mask_4d(attn_mask, query, key)
        if attn_mask is not None and mask is None:  # other masks: diffusers' backends interpret them
            reason = "an attention mask other than a key mask"
        elif parallel_config is not None:
            reason = "context parallelism"
        elif attention_kwargs:
            reason = f"attention_kwargs {sorted(attention_kwargs)}"
        if reason is None:
            def to_diffusers(q, k, v, _mask, dropout_p, is_causal, scale, enable_gqa):
                # what attnlib leaves (dropout, a scale it refuses, ...) goes to diffusers' own
                # dispatch, so a backend set with set_attention_backend serves it (with the mask
                # as the processor gave it)
                q, k, v = (t.transpose(1, 2) for t in (q, k, v))
                out = original(q, k, v, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                               backend=backend, parallel_config=parallel_config)
                return out.transpose(1, 2)

            q, k, v = (t.transpose(1, 2) for t in (query, key, value))
            out = _to_attnlib(route, q, k, v, mask, dropout_p, is_causal, scale, enable_gqa, to_diffusers,
                              "diffusers dispatch_attention_fn")
            return out.transpose(1, 2)
        _log_once("attnlib: diffusers dispatch_attention_fn -> diffusers (%s)", reason)
        return original(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, attention_kwargs,
                        backend=backend, parallel_config=parallel_config)

    return dispatch_attention_fn


def _key_mask_4d(attn_mask, query, key):
    """diffusers' attention mask as torch SDPA's (B or 1, Hq or 1, 1, Sk) key mask when it is one,
    else None. q/k are (batch, seq, heads, head_dim). diffusers' native backend reads a 2-D mask of
    shape (batch, seq_k) as a key mask (HunyuanVideo's padded prompt arrives as (B, 1, 1, N),
    LTX-Video's and Sana's prompt masks, repeated per head by Attention.prepare_attention_mask, as
    (B, Hq, 1, N)); other shapes follow SDPA's broadcasting."""
    if not isinstance(attn_mask, torch.Tensor) or query.dim() != 4 or key.dim() != 4:
        return None
    batch, seq_k = query.shape[0], key.shape[1]
    if attn_mask.dim() == 2 and tuple(attn_mask.shape) == (batch, seq_k):
        return attn_mask[:, None, None, :]
    if key_only_mask(attn_mask, batch, query.shape[2], seq_k) is None:
        return None
    return attn_mask


def _functional_router(original: types.ModuleType, route: _Route) -> types.SimpleNamespace:
    """torch.nn.functional as a legacy processor sees it, with SDPA on attnlib (which falls back to
    torch itself for masks and dropout)."""

    def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                                     scale=None, enable_gqa=False):
        return _to_attnlib(route, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)

    return types.SimpleNamespace(**{**vars(original), "scaled_dot_product_attention": scaled_dot_product_attention})


# --------------------------------------------------------------------------- processor classes

def _code_names(code: types.CodeType) -> set[str]:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _helpers(call: types.FunctionType) -> dict[str, types.FunctionType]:
    """The module-level Python functions of call's module that call reaches by name, directly or
    through one another (Flux2's KV-cache processors attend in _flux2_kv_causal_attention)."""
    g, found, todo = call.__globals__, {}, [call]
    while todo:
        for n in _code_names(todo.pop().__code__):
            f = g.get(n)
            if isinstance(f, types.FunctionType) and f.__globals__ is g and n not in found:
                found[n] = f
                todo.append(f)
    return found


def _reached_names(fn: types.FunctionType) -> set[str]:
    """The global names fn's code uses, and those of the module-level functions it reaches (_helpers)."""
    names = _code_names(fn.__code__)
    for f in _helpers(fn).values():
        names |= _code_names(f.__code__)
    return names


def _helpers_reaching(call: types.FunctionType, names: tuple[str, ...]) -> dict[str, types.FunctionType]:
    """Those of _helpers(call) from which every one of names is reached (in their own code or in
    the helpers they call): the functions a routed class must run on its shadow module's globals."""
    return {n: f for n, f in _helpers(call).items() if set(names) <= _reached_names(f)}


def _rebinding(cls: type) -> tuple[str, Callable] | tuple[None, str]:
    """(global name, router factory) through which cls.__call__ reaches attention (in its own code
    or in module-level functions of its module that it calls), or (None, why not)."""
    from diffusers.models import attention_dispatch
    call = cls.__call__
    if not isinstance(call, types.FunctionType) or not call.__module__.startswith("diffusers."):
        return None, "its __call__ is not a Python function defined in diffusers"
    names, g = _reached_names(call), call.__globals__
    if _DISPATCH_NAME in names:
        if g.get(_DISPATCH_NAME) is attention_dispatch.dispatch_attention_fn:
            return _DISPATCH_NAME, _dispatch_router
        return None, f"its module's {_DISPATCH_NAME} is not diffusers' own ({g.get(_DISPATCH_NAME)!r})"
    if "F" in names and "scaled_dot_product_attention" in names and g.get("F") is torch.nn.functional:
        return "F", _functional_router
    return None, f"its __call__ calls attention through neither {_DISPATCH_NAME} nor F.scaled_dot_product_attention"


# Shadow modules by name -> the live processors that use them (by id, weakly). torch.compile reaches
# a function's globals through sys.modules[__globals__["__name__"]], so each routed copy of a
# processor's globals is a registered module of its own, dropped once no live processor uses it:
# when the last one is restored (remove(), or diffusers' set_processor on a switched module), and
# at the next switch or restore after the last one was garbage collected (a dropped deepcopy).
# Weak references rather than a count, because pickle and deepcopy make users apply() never saw.
_shadow_users: dict[str, weakref.WeakValueDictionary] = {}
# Routed classes by shadow module name. Names are unique across processes (uuid), so unpickling or
# deepcopying a processor in the process that made its class finds that class again.
_routed_classes: weakref.WeakValueDictionary = weakref.WeakValueDictionary()
# Attention module classes with apply()'s set_processor hook, by original class (a few per process).
_hooked_classes: dict[type, type] = {}


def _reduce_as(self, protocol: int, loader: Callable, loader_args: tuple):
    """__reduce_ex__ for the classes made here. pickle (torch.save) stores a class by its qualified
    name, which a class made at run time does not have, so the object is reduced as its class's
    parent would reduce it and loader(*loader_args, ...) makes the run-time class again on load.
    deepcopy takes the same path."""
    cls = type(self)
    rv = super(cls, self).__reduce_ex__(protocol)  # (copyreg.__newobj__ or _reconstructor, (cls, ...), state, ...)
    # protocols 0 and 1 (copyreg._reduce_ex) name self.__class__, which a routed processor reads as its original
    if not (isinstance(rv, tuple) and len(rv) >= 2 and rv[1] and rv[1][0] in (cls, self.__class__)):
        return rv  # a parent's own __reduce__ that does not name the class: nothing to replace
    return (loader, (*loader_args, rv[0], rv[1][1:])) + rv[2:]


def _processor_reduce_ex(self, protocol):
    cls = type(self)
    return _reduce_as(self, protocol, _load_processor,
                      (cls._attnlib_original_class, cls._attnlib_shadow.__name__, cls._attnlib_route))


def _module_reduce_ex(self, protocol):
    return _reduce_as(self, protocol, _load_module, (type(self)._attnlib_module_class,))


def _load_processor(original: type, module_name: str, route: _Route, new: Callable, args: tuple):
    """Unpickles a routed processor (see _reduce_as): the routed class for that route, built again if
    this process has none (a fresh process), or the original class if this diffusers cannot be routed."""
    with _lock:
        routed = _routed_classes.get(module_name)
        if routed is None:
            try:
                _diffusers()
                name, factory = _rebinding(original)
                if name is None:
                    raise RuntimeError(factory)
            except RuntimeError as e:
                log.warning("attnlib: unpickled diffusers processor %s runs natively (%s)", original.__name__, e)
                return new(original, *args)
            routed = _register_routed(_routed_class(original, name, factory, route, module_name))
        processor = new(routed, *args)
        _acquire(processor, routed)
        return processor


def _load_module(original: type, new: Callable, args: tuple):
    with _lock:
        return new(_hooked_class(original), *args)


# Assigning obj.__class__, which the routed classes' __class__ property hides (its setter).
_SET_CLASS = object.__dict__["__class__"].__set__


def _routed_class(cls: type, name: str, factory: Callable, route: _Route, module_name: str | None = None) -> type:
    """A subclass of cls whose __call__ is cls.__call__'s code with `name` bound to attnlib. Its
    instances' ``__class__`` reads as cls (type() gives the subclass): diffusers tests processor
    classes by membership, ``proc.__class__ in CROSS_ATTENTION_PROCESSORS`` in the UNets' and VAEs'
    set_default_attn_processor, which raised after apply(); assigning ``__class__`` still works."""
    original_call = cls.__call__
    module_name = module_name or f"{__name__}._routed_{uuid.uuid4().hex}"  # one per (class, apply call)
    shadow = types.ModuleType(module_name, original_call.__globals__.get("__doc__"))
    shadow.__dict__.update(original_call.__globals__)
    shadow.__dict__.update(__name__=module_name, __spec__=None, __loader__=None)
    shadow.__dict__[name] = factory(original_call.__globals__[name], route)
    # helpers that attend for __call__ look the router up in the shadow module too
    needs = ("F", "scaled_dot_product_attention") if name == "F" else (name,)
    for helper_name, helper in _helpers_reaching(original_call, needs).items():
        shadow.__dict__[helper_name] = _rebound(helper, shadow.__dict__)
    call = _rebound(original_call, shadow.__dict__)
    routed = type(cls.__name__, (cls,), {
        "__call__": call, "__module__": cls.__module__, "__doc__": cls.__doc__,
        "__qualname__": f"{cls.__qualname__}[attnlib {route.method}]", "__reduce_ex__": _processor_reduce_ex,
        "__class__": property(lambda self: cls, _SET_CLASS),
        "_attnlib_original_class": cls, "_attnlib_shadow": shadow, "_attnlib_route": route,
    })
    return routed


def _rebound(f: types.FunctionType, globals_: dict) -> types.FunctionType:
    """f's code, defaults, closure and attributes with globals_ as its globals."""
    g = types.FunctionType(f.__code__, globals_, f.__name__, f.__defaults__, f.__closure__)
    g.__kwdefaults__ = f.__kwdefaults__
    g.__qualname__, g.__doc__ = f.__qualname__, f.__doc__
    g.__annotations__ = dict(f.__annotations__)
    g.__dict__.update(f.__dict__)
    return g


def _register_routed(routed: type) -> type:
    """Makes a routed class findable by its shadow module's name (unpickling looks it up); the
    caller holds _lock."""
    _routed_classes[routed._attnlib_shadow.__name__] = routed
    return routed


def _acquire(processor, routed: type) -> None:
    shadow = routed._attnlib_shadow
    sys.modules[shadow.__name__] = shadow
    _shadow_users.setdefault(shadow.__name__, weakref.WeakValueDictionary())[id(processor)] = processor


def _drop_unused_shadows() -> None:
    for module_name, users in list(_shadow_users.items()):
        if not users:
            del _shadow_users[module_name]
            sys.modules.pop(module_name, None)


def _switch(processor, routed: type) -> None:
    _unswitch(processor)
    processor.__class__ = routed
    _acquire(processor, routed)
    _drop_unused_shadows()


def _unswitch(processor) -> None:
    original = _original_class(processor)
    if original is None:
        return
    users = _shadow_users.get(type(processor)._attnlib_shadow.__name__)
    processor.__class__ = original
    if users is not None:
        users.pop(id(processor), None)
    _drop_unused_shadows()


def _original_class(processor) -> type | None:
    return type(processor).__dict__.get("_attnlib_original_class")


def _set_processor(self, processor) -> None:
    """set_processor of an attention module whose processor apply() switched (diffusers'
    set_attn_processor and set_default_attn_processor call it). Replacing the processor undoes
    apply() for this module, as remove() would: the replaced processor gets its class back (and its
    shadow module is dropped with its last user; a processor shared by several modules is thereby
    restored for all of them), the module gets its class back, then diffusers' set_processor runs.
    Setting the processor the module has keeps it switched (see the module docstring: PAG)."""
    original = type(self)._attnlib_module_class
    with _lock:
        if processor is not getattr(self, "processor", None):
            _unswitch(getattr(self, "processor", None))
            self.__class__ = original
    original.set_processor(self, processor)


def _hooked_class(cls: type) -> type:
    """A subclass of an attention module class whose set_processor undoes apply() (see _set_processor)."""
    hooked = _hooked_classes.get(cls)
    if hooked is None:
        hooked = _hooked_classes[cls] = type(cls.__name__, (cls,), {
            "set_processor": _set_processor, "__reduce_ex__": _module_reduce_ex, "__module__": cls.__module__,
            "__qualname__": f"{cls.__qualname__}[attnlib]", "__doc__": cls.__doc__, "_attnlib_module_class": cls,
        })
    return hooked


def _hook(module) -> None:
    if "_attnlib_module_class" not in type(module).__dict__:
        module.__class__ = _hooked_class(type(module))


def _unhook(module) -> None:
    original = type(module).__dict__.get("_attnlib_module_class")
    if original is not None:
        module.__class__ = original


# --------------------------------------------------------------------------- discovery

def _models(model_or_pipeline) -> list[torch.nn.Module]:
    if isinstance(model_or_pipeline, torch.nn.Module):
        return [model_or_pipeline]
    components = getattr(model_or_pipeline, "components", None)
    if not isinstance(components, dict):
        components = getattr(model_or_pipeline, "__dict__", {})
    models = [m for name, m in components.items()
              if isinstance(m, torch.nn.Module) and name.startswith(COMPONENT_PREFIXES)]
    if not models:
        raise TypeError(f"expected a diffusers model (torch.nn.Module) or a pipeline with "
                        f"{'/'.join(p + '*' for p in COMPONENT_PREFIXES)} components, got "
                        f"{type(model_or_pipeline).__name__}")
    return models


def _processor_module_classes() -> tuple[type, ...]:
    """The classes of diffusers' attention modules that hold a processor."""
    from diffusers.models.attention import AttentionModuleMixin
    from diffusers.models import attention_processor
    return tuple(c for c in (AttentionModuleMixin, getattr(attention_processor, "Attention", None),
                             getattr(attention_processor, "MochiAttention", None)) if c is not None)


def _attention_modules(models: list[torch.nn.Module]):
    """Modules that hold a diffusers attention processor (as diffusers' set_attention_backend finds them)."""
    classes = _processor_module_classes()
    seen: set[int] = set()
    for model in models:
        for module in model.modules():
            if not isinstance(module, classes) or id(module) in seen:
                continue
            seen.add(id(module))
            if getattr(module, "processor", None) is not None:
                yield module


def _attends_natively(cls: type) -> bool:
    """Whether cls (not an attention module with a processor) calls attention in its own forward,
    or in module-level functions of its module that forward calls: Mochi's and HunyuanDiT's
    attention pools, SanaWM's softmax attention. apply() does not switch those (nor torch's
    nn.MultiheadAttention modules); it says so."""
    forward = getattr(cls, "forward", None)
    if not isinstance(forward, types.FunctionType) or not forward.__module__.startswith("diffusers."):
        return False
    return bool(_reached_names(forward) & {"scaled_dot_product_attention", "multi_head_attention_forward",
                                           _DISPATCH_NAME})


def _log_native_modules(models: list[torch.nn.Module]) -> None:
    with_processor = _processor_module_classes()
    counts = Counter(type(m) for model in models for m in model.modules())  # each class inspected once
    found = sorted((cls.__name__, n) for cls, n in counts.items() if not issubclass(cls, with_processor)
                   and (issubclass(cls, torch.nn.MultiheadAttention) or _attends_natively(cls)))
    for name, count in found:
        _log_once("attnlib: diffusers module %s (x%d) left as is: it calls attention in its own forward, "
                  "not through a processor", name, count)


# --------------------------------------------------------------------------- public API

def apply(model_or_pipeline, method: str = "flash", backend: str = "auto", **method_options: Any) -> int:
    """Run the attention core of every attention module on attnlib; returns how many were switched.

    ``model_or_pipeline``: a diffusers model (``ModelMixin``) or a pipeline, whose ``transformer*``
    and ``unet*`` components are switched. ``method`` is one of flash, sage, sla, linear
    (approximate methods only when named); ``method_options`` are that method's options (e.g.
    ``smooth_k`` for sage, ``critical``/``negligible``/``block_size`` for sla). Calls attnlib cannot
    serve exactly (attention masks, dropout, context parallelism) stay with diffusers/torch and are
    logged once at INFO, as are processors left as they are and modules that call attention in
    their own forward rather than through a processor (Mochi's and HunyuanDiT's attention pools,
    SanaWM's softmax attention), which stay on torch. Applying again replaces the method and options.
    """
    dispatch.check_method(method)
    if method not in METHODS:
        raise ValueError(f"diffusers apply method must be one of {METHODS}, got {method!r}")
    dispatch.check_backend(backend)
    check_method_options(method, method_options)  # names and values, here rather than at the first forward
    _diffusers()
    models = _models(model_or_pipeline)
    route = _Route(method, backend, dict(method_options))

    plan: dict[int, tuple[Any, type]] = {}  # processor id -> (processor, its routed class)
    modules = []  # attention modules whose processor is switched: their set_processor undoes apply()
    classes: dict[type, type | str] = {}  # original class -> routed class, or why it is left as is
    switched: Counter = Counter()
    for module in _attention_modules(models):
        processor = module.processor
        cls = _original_class(processor) or type(processor)
        if cls not in classes:
            name, factory = _rebinding(cls)
            classes[cls] = factory if name is None else _routed_class(cls, name, factory, route)
        if isinstance(classes[cls], str):
            continue
        plan[id(processor)] = (processor, classes[cls])
        modules.append(module)
        switched[cls.__name__] += 1
    skipped = {cls.__name__: why for cls, why in classes.items() if isinstance(why, str)}
    for cls_name, why in skipped.items():
        _log_once("attnlib: diffusers processor %s left as is (%s)", cls_name, why)
    total = sum(switched.values())
    if total == 0:
        detail = "; ".join(f"{k}: {v}" for k, v in skipped.items()) or "no attention modules found"
        raise ValueError(f"attnlib.integrations.diffusers.apply found no attention module it can switch ({detail})")
    with _lock:  # all or nothing: nothing above changed the model
        for processor, routed in plan.values():
            _register_routed(routed)
            _switch(processor, routed)
        for module in modules:
            _hook(module)
    log.info("attnlib: diffusers %s -> %s (%s)", ", ".join(type(m).__name__ for m in models), method,
             ", ".join(f"{n} x{c}" for n, c in sorted(switched.items())))
    _log_native_modules(models)
    return total


def remove(model_or_pipeline) -> int:
    """Undo apply(): every switched processor gets its original class back; returns how many modules."""
    with _lock:
        modules = list(_attention_modules(_models(model_or_pipeline)))
        switched = [m for m in modules if _original_class(m.processor)]
        for module in switched:
            _unswitch(module.processor)  # a no-op once a shared processor is restored
        for module in modules:
            _unhook(module)
    return len(switched)
