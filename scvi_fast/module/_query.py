"""Reference mapping (scArches, as scvi-tools' ``load_query_data``): which weights of a query
model train.

A query model's decoder has one more gathered row per new batch (or categorical covariate)
category, all else the reference's (:func:`load_reference_state`). :func:`set_online_update` then applies scvi-tools'
``freeze_*`` flags with scvi-tools 1.4.2's semantics (``_set_params_online_update``):

* parameters of the hidden layers (every encoder and decoder ``Linear``, batch rows included)
  keep ``requires_grad``; the BatchNorm scales and shifts keep it unless their
  ``freeze_batchnorm_*`` flag is set; every other parameter (``z`` mean and variance heads,
  the output layer, ``px_r``) is frozen;
* in the "hooked" hidden layers (all but the first encoder layer when
  ``freeze_expression=False``, all but the first decoder layer when
  ``freeze_decoder_first_layer=False``) a gradient hook zeroes the gradient of the weight and
  bias, so that only the decoder's batch rows get a gradient. The optimiser still holds these
  tensors, so Adam's weight decay moves them slightly, exactly as it does in scvi-tools (the
  batch rows of reference categories absent from the query change only that way, those the
  query shares with the reference train);
* a frozen BatchNorm gets ``momentum = 0`` and ``freeze_dropout`` sets the dropout rate to 0;
* the module trains in eval mode (:func:`keep_eval_mode`): scvi-tools' ``load_query_data``
  leaves its module in eval mode and Lightning's fit loop (2.2 and later) keeps the mode it
  finds, so a query trains without dropout and normalises with the reference's BatchNorm
  running statistics, which stay unchanged whatever the flags.

When the reference had a single batch category (no batch columns at all), the reference
category's row is zero, so reference cells decode exactly as before (scvi-tools starts that
row from the new layer's random initialisation).
"""

from __future__ import annotations

import types

import torch
from torch import nn

#: ``load_query_data``'s freeze flags and scvi-tools' defaults
FREEZE_DEFAULTS = {
    "unfrozen": False,
    "freeze_dropout": False,
    "freeze_expression": True,
    "freeze_decoder_first_layer": True,
    "freeze_batchnorm_encoder": True,
    "freeze_batchnorm_decoder": False,
}


def _zero_like(grad: torch.Tensor) -> torch.Tensor:
    # scvi-tools' weight hook: a fresh zero gradient (the batch columns live in weight_cov here)
    return torch.zeros_like(grad)


def _times_zero(grad: torch.Tensor) -> torch.Tensor:
    # scvi-tools' bias hook (``grad * 0``: a non-finite gradient stays non-finite)
    return grad * 0


def _hidden_layers(module: nn.Module) -> tuple[list, list]:
    """``(encoder layers, decoder layers)`` in scvi-tools' ``FCLayers`` order."""
    enc = [module.encoder.first, *module.encoder.linears]
    return enc, list(module.decoder.linears)


def _train_eval_only(self, mode: bool = True):
    return nn.Module.train(self, False)


def keep_eval_mode(module: nn.Module) -> nn.Module:
    """Make ``module.train()`` leave ``module`` (and every submodule) in eval mode."""
    module.train = types.MethodType(_train_eval_only, module)
    return module.eval()


def set_online_update(module: nn.Module, *, unfrozen: bool = False, freeze_dropout: bool = False,
                      freeze_expression: bool = True, freeze_decoder_first_layer: bool = True,
                      freeze_batchnorm_encoder: bool = True,
                      freeze_batchnorm_decoder: bool = False) -> nn.Module:
    """Choose what a query model (a :class:`~scvi_fast.module.VAE`) trains, in place.

    The flags and their defaults are those of ``scvi.model.SCVI.load_query_data`` (see the
    module docstring for what each does); ``unfrozen=True`` leaves every parameter trainable.
    The module trains in eval mode either way.
    """
    keep_eval_mode(module)
    if unfrozen:
        return module
    enc, dec = _hidden_layers(module)
    hidden = {id(p) for layer in enc + dec for p in layer.parameters()}
    bn_enc = [b.norm for b in module.encoder.blocks]
    bn_dec = [b.norm for b in module.decoder.blocks]
    trainable_bn = ({id(p) for bn in bn_enc for p in bn.parameters()} if not freeze_batchnorm_encoder
                    else set())
    if not freeze_batchnorm_decoder:
        trainable_bn |= {id(p) for bn in bn_dec for p in bn.parameters()}
    # the library encoder trains whole, without hooks, frozen BatchNorm or removed dropout
    # (scvi-tools' ``mod_no_hooks_yes_grad``)
    l_enc = getattr(module, "l_encoder", None)
    library = {id(p) for p in l_enc.parameters()} if l_enc is not None else set()
    for p in module.parameters():
        p.requires_grad_(id(p) in hidden or id(p) in trainable_bn or id(p) in library)
    hooked = enc[0 if freeze_expression else 1:] + dec[0 if freeze_decoder_first_layer else 1:]
    for layer in hooked:
        # only the one-hot columns (weight_cov) train in a hooked layer, as scvi-tools' hook
        # keeps the gradient of the categorical columns only (continuous ones included)
        layer.weight.register_hook(_zero_like)
        layer.bias.register_hook(_times_zero)
        if getattr(layer, "weight_cont", None) is not None:
            layer.weight_cont.register_hook(_zero_like)
    for bn in (bn_enc if freeze_batchnorm_encoder else []) + (bn_dec if freeze_batchnorm_decoder else []):
        bn.momentum = 0.0
    if freeze_dropout:
        for block in module.encoder.blocks:
            block.dropout_rate = 0.0
    return module


def _blocks(sizes) -> list[tuple[int, int, int]]:
    """``(categorical index, first row, rows)`` of each one-hot block of a stacked table: the
    batch, then each categorical covariate, those of one category having none."""
    out, start = [], 0
    for i, k in enumerate(sizes):
        if k > 1:
            out.append((i, start, k))
            start += k
    return out


@torch.no_grad()
def load_reference_state(module: nn.Module, reference_state: dict, n_reference_batches) -> None:
    """Copy a reference VAE's ``state_dict`` into ``module``, a VAE with more category rows.

    ``n_reference_batches`` is the reference's number of batch categories, or the category
    counts of its batch and of each categorical covariate (``[n_batch, *n_cats_per_cov]``).
    Every tensor is the reference's except, in every stacked ``weight_cov`` table, the rows of
    categories the reference does not have: each covariate's block keeps the reference's rows
    first and its new categories' rows after them, from ``module``'s own (seeded,
    ``nn.Linear``-style) initialisation. A reference covariate of one category (no columns)
    gets a zero row for that category. (scvi-tools pads the whole concatenated weight at its
    end instead, which shifts the columns of a covariate that follows one that gained
    categories; with new categories in the last categorical only, e.g. a batch-only model,
    the two agree.) Other tensors sized by the batches (a ``"gene-batch"`` ``px_r``, the library
    prior) keep the reference's entries in front and the module's own after them, as
    scvi-tools pads them.
    """
    sizes = ([int(n_reference_batches), *getattr(module, "n_cats_per_cov", ())]
             if isinstance(n_reference_batches, int) else [int(k) for k in n_reference_batches])
    query_sizes = [int(module.n_batch), *getattr(module, "n_cats_per_cov", ())]
    if len(sizes) != len(query_sizes) or any(r > q for r, q in zip(sizes, query_sizes)):
        raise ValueError(f"the query's categories {query_sizes} do not extend the reference's "
                         f"{sizes}")
    ref_blocks = {i: (start, k) for i, start, k in _blocks(sizes)}
    state = module.state_dict()
    for key, ref in reference_state.items():
        if key not in state:
            raise ValueError(f"reference tensor {key} has no place in the query model")
        if key.endswith("weight_cov"):
            continue
        ref = ref.detach().cpu()
        if ref.shape != state[key].shape and ref.dim() == state[key].dim():
            padded = state[key].clone()
            padded[tuple(slice(0, n) for n in ref.shape)] = ref
            state[key] = padded
        else:
            state[key] = ref.clone()
    for key in state:
        if key.endswith("weight_cov"):
            table = state[key].clone()
            ref = reference_state.get(key)
            for i, start, _ in _blocks(query_sizes):
                if i in ref_blocks and ref is not None:
                    r0, k = ref_blocks[i]
                    table[start:start + k] = ref[r0:r0 + k].detach().cpu()
                else:
                    table[start:start + sizes[i]] = 0
            state[key] = table
    module.load_state_dict(state)
