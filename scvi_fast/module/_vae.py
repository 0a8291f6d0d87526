"""scVI's VAE (scvi-tools ``scvi.module.VAE``).

Inference: ``log1p`` counts -> encoder -> ``q_m``, ``q_v = exp(raw) + VAR_EPS`` -> ``z``
(softmax of the sample for ``latent_distribution="ln"``); the library is the observed
``log(sum_g x_g)``, or with ``use_observed_lib_size=False`` a sample of the library encoder
``l_encoder``. Generative: ``[z, cont, batch, cat_covs]`` -> decoder with the categorical
covariates injected into every layer (or the first) -> softmax logits (softplus with size
factors), ``px_r`` per the ``dispersion`` and, for ZINB, the ``px_dropout`` head.
Loss: per-cell ``-log p(x | exp(l) softmax, ...)`` of the gene likelihood, the analytic KL of
``z`` (annealed) and of the library (not annealed, as scvi-tools), one route:
:meth:`VAE.loss`. What each option changes lives in :mod:`scvi_fast.module._generative`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from scvi_fast import functional as F_ops
from scvi_fast.module import _generative as gen_opts
from scvi_fast.module._layers import OutputLinear
from scvi_fast.module._networks import Decoder, Encoder
from scvi_fast.module._posterior import LossOutput, _tile, fp32, posterior_variance, sample_z
from scvi_fast.reference import csr_masked, csr_to_dense


class VAE(nn.Module):
    """scVI: scvi-tools' ``VAE`` with its gene likelihoods, dispersions, latent distributions
    and library encoder.

    Parameters
    ----------
    n_input
        Number of genes.
    n_batch
        Number of batch categories; with one (or none) the decoder has no
        covariate columns, like scvi-tools.
    n_labels
        Number of label categories (used by ``dispersion="gene-label"``).
    n_hidden, n_latent, n_layers, dropout_rate
        Architecture, scvi-tools' defaults 128 / 10 / 1 / 0.1.
    dispersion
        ``"gene"`` (``px_r`` ``(G,)``), ``"gene-batch"`` (``(G, n_batch)``), ``"gene-label"``
        (``(G, n_labels)``) or ``"gene-cell"`` (the decoder head ``px_r_decoder``).
    gene_likelihood
        ``"zinb"`` (scvi-tools' default; adds the ``px_dropout_decoder`` head), ``"nb"`` or
        ``"poisson"``.
    latent_distribution
        ``"normal"`` or ``"ln"`` (``z`` is the softmax of the normal sample).
    use_observed_lib_size
        True: the library is the observed total count; False: the library encoder
        ``l_encoder`` with the per-batch prior ``library_log_means`` / ``library_log_vars``
        (``(1, n_batch)``, see :func:`~scvi_fast.module._generative.init_library_size`).
    impl
        Back-end of the fused ops (``"auto" | "triton" | "native" | "torch"``).
    n_cats_per_cov
        Categories of each extra categorical covariate (scvi-tools' ``n_cats_per_cov``); one
        with a single category adds no columns, as in scvi-tools. Their one-hot columns follow
        the batch's in one stacked table per layer (codes offset, see :meth:`covariate_codes`).
    n_continuous_cov
        Number of continuous covariates, concatenated to the first layer's input.
    encode_covariates
        Feed the batch and the covariates to the encoder too.
    deeply_inject_covariates
        Inject the categorical covariates into every hidden layer (else the first only).
    use_size_factor_key
        Use the minibatch's ``size_factor`` as the library (``log`` of it) and scvi-tools'
        ``softplus`` expression scale instead of the softmax.
    """

    def __init__(
        self,
        n_input: int,
        n_batch: int = 0,
        n_labels: int = 0,
        n_hidden: int = 128,
        n_latent: int = 10,
        n_layers: int = 1,
        dropout_rate: float = 0.1,
        dispersion: str = "gene",
        gene_likelihood: str = "zinb",
        latent_distribution: str = "normal",
        use_observed_lib_size: bool = True,
        library_log_means=None,
        library_log_vars=None,
        impl: str = "auto",
        n_cats_per_cov: Sequence[int] = (),
        n_continuous_cov: int = 0,
        encode_covariates: bool = False,
        deeply_inject_covariates: bool = True,
        use_size_factor_key: bool = False,
    ):
        super().__init__()
        if n_layers < 1:
            raise ValueError(f"n_layers must be at least 1; got {n_layers}")
        gen_opts.check_options(gene_likelihood, dispersion, latent_distribution,
                               use_observed_lib_size)
        self.n_input, self.n_batch, self.n_labels = n_input, n_batch, n_labels
        self.n_hidden, self.n_latent, self.n_layers = n_hidden, n_latent, n_layers
        self.dropout_rate = dropout_rate
        self.dispersion, self.gene_likelihood = dispersion, gene_likelihood
        self.latent_distribution = latent_distribution
        self.use_observed_lib_size = bool(use_observed_lib_size)
        self._impl = impl
        self.n_cats_per_cov = tuple(int(k) for k in n_cats_per_cov)
        self.n_continuous_cov = int(n_continuous_cov)
        self.encode_covariates = bool(encode_covariates)
        self.deeply_inject_covariates = bool(deeply_inject_covariates)
        self.use_size_factor_key = bool(use_size_factor_key)
        # scvi-tools' cat_list: the batch, then each covariate; one category adds no column
        sizes = [int(n_batch), *self.n_cats_per_cov]
        self._cat_columns = [i for i, k in enumerate(sizes) if k > 1]
        offsets = np.concatenate([[0], np.cumsum([sizes[i] for i in self._cat_columns])])
        n_cov = int(offsets[-1])
        self.register_buffer("cat_offsets", torch.as_tensor(offsets[:-1], dtype=torch.int64),
                             persistent=False)
        n_cont, deep = self.n_continuous_cov, self.deeply_inject_covariates
        # the z encoder and the library encoder read the same covariate columns (scvi-tools'
        # encoder_cat_list and n_input_encoder)
        enc_cov = dict(n_cov=n_cov if encode_covariates else 0,
                       n_cont=n_cont if encode_covariates else 0, deep=deep)
        self.encoder = Encoder(n_input, n_latent, n_hidden, n_layers, dropout_rate, impl,
                               **enc_cov)
        self.decoder = Decoder(n_latent, n_input, n_hidden, n_layers, n_cov, n_cont, deep)
        # created in this order so that an NB, per-gene model initialises as it always has
        shape = gen_opts.dispersion_shape(dispersion, n_input, n_batch, n_labels)
        if shape is None:
            self.register_parameter("px_r", None)
            self.px_r_decoder = OutputLinear(n_hidden, n_input)
        else:
            self.px_r = nn.Parameter(torch.randn(shape))
            self.px_r_decoder = None
        self.px_dropout_decoder = (OutputLinear(n_hidden, n_input)
                                   if gene_likelihood == "zinb" else None)
        self.l_encoder = None
        if not self.use_observed_lib_size:
            if library_log_means is None or library_log_vars is None:
                raise ValueError("use_observed_lib_size=False needs library_log_means and "
                                 "library_log_vars (see init_library_size)")
            k = max(n_batch, 1)
            for name, t in (("library_log_means", library_log_means),
                            ("library_log_vars", library_log_vars)):
                t = torch.as_tensor(np.asarray(t), dtype=torch.float32).reshape(1, -1)
                if t.shape[1] != k:
                    raise ValueError(f"{name} must have shape (1, {k}); got {tuple(t.shape)}")
                self.register_buffer(name, t)
            self.l_encoder = Encoder(n_input, 1, n_hidden, 1, dropout_rate, impl, **enc_cov)

    @property
    def impl(self) -> str:
        return self._impl

    @impl.setter
    def impl(self, value: str) -> None:
        F_ops._check_impl(value)
        self._impl = value
        for enc in (self.encoder, self.l_encoder):
            if enc is None:
                continue
            enc.first.impl = value
            for block in enc.blocks:
                block.impl = value

    @property
    def has_covariates(self) -> bool:
        return self.decoder.linears[0].weight_cov is not None

    def covariate_codes(self, batch: torch.Tensor | None,
                        cat_covs: torch.Tensor | None = None) -> torch.Tensor | None:
        """The categorical codes of a minibatch, offset into the stacked one-hot tables.

        ``batch`` ``(B,)`` and ``cat_covs`` ``(B, n_cats)`` (codes in each covariate's
        categories) become ``(B,)`` codes when one categorical has columns, ``(B, C)`` when
        several do, None when none does (the layers then take no codes).
        """
        if not self._cat_columns:
            return None
        cols = []
        for i in self._cat_columns:
            if i == 0:
                if batch is None:
                    raise ValueError("this model has batch covariates; the minibatch carries none")
                cols.append(batch.reshape(-1))
            else:
                if cat_covs is None:
                    raise ValueError("this model has categorical covariates; the minibatch "
                                     "carries none")
                cols.append(cat_covs[:, i - 1])
        if len(cols) == 1:
            return cols[0].to(device=self.cat_offsets.device, dtype=torch.int64)
        codes = torch.stack(cols, 1).to(device=self.cat_offsets.device, dtype=torch.int64)
        return codes + self.cat_offsets

    def _continuous(self, cont_covs: torch.Tensor | None) -> torch.Tensor | None:
        if not self.n_continuous_cov:
            return None
        if cont_covs is None:
            raise ValueError("this model has continuous covariates; the minibatch carries none")
        return cont_covs.reshape(-1, self.n_continuous_cov)

    @staticmethod
    def covariates_of(x) -> dict:
        """``cat_covs`` / ``cont_covs`` of minibatch ``x`` (None where it has none), the
        keyword arguments :meth:`generative` and :meth:`decode_scale` take beside the batch."""
        return {"cat_covs": getattr(x, "cat_covs", None), "cont_covs": getattr(x, "cont_covs", None)}

    @staticmethod
    def _codes(codes: torch.Tensor | None, n: int, device) -> torch.Tensor | None:
        """``codes`` as ``(n,)`` int64 on ``device``, repeated over samples (None stays None)."""
        if codes is None:
            return None
        codes = codes.reshape(-1).to(device=device, dtype=torch.int64)
        if codes.numel() != n:
            codes = codes.repeat(n // codes.numel())
        return codes

    def z_transformation(self, z: torch.Tensor) -> torch.Tensor:
        """What the decoder reads of a posterior sample: ``z`` (``"normal"``) or
        ``softmax(z)`` (``"ln"``), scvi-tools' ``Encoder.z_transformation``."""
        return gen_opts.z_transformation(z, self.latent_distribution)

    # ---- inference -------------------------------------------------------------
    def _encode(self, x, need_var: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(q_m, raw)``: the encoder's heads, in float32 when autocast ran them in 16 bits."""
        q_m, raw = self.encoder(x, need_var, *self._encoder_covariates(x))
        return fp32(q_m), fp32(raw)

    def _encoder_covariates(self, x) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """``(codes, cont)`` that the encoders read of minibatch ``x``: both None unless
        ``encode_covariates``."""
        if not self.encode_covariates:
            return None, None
        return (self.covariate_codes(getattr(x, "batch", None), getattr(x, "cat_covs", None)),
                self._continuous(getattr(x, "cont_covs", None)))

    def posterior(self, x, need_var: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Posterior mean and variance ``(q_m, q_v)`` of ``z``: the encoder only, no sampling.

        ``q_v = exp(raw) + VAR_EPS``. With ``need_var=False`` the variance head is skipped and
        ``q_v`` is None. Sample from it with :func:`sample_z` (then
        :meth:`z_transformation` for the decoder).
        """
        q_m, raw = self._encode(x, need_var)
        return q_m, (posterior_variance(raw) if need_var else None)

    def log_library(self, x, dtype=torch.float32) -> torch.Tensor:
        """``(B,)`` log of the observed library ``sum_g x_g``, or of the minibatch's
        ``size_factor`` with ``use_size_factor_key`` (as scvi-tools, which then scales the
        expression rate by the size factor even where a library encoder is trained)."""
        if self.use_size_factor_key:
            sf = getattr(x, "size_factor", None)
            if sf is None:
                raise ValueError("this model uses size factors; the minibatch carries none")
            return torch.log(sf.to(dtype).reshape(-1))
        return torch.log(x.library.to(dtype).reshape(-1))

    def library_posterior(self, x) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ql_m, ql_v)``, ``(B,)``: the library encoder's posterior of the log library
        (``use_observed_lib_size=False`` only)."""
        if self.l_encoder is None:
            raise ValueError("this model uses the observed library size; it has no library "
                             "encoder")
        m, raw = self.l_encoder(x, True, *self._encoder_covariates(x))
        return fp32(m).reshape(-1), posterior_variance(fp32(raw)).reshape(-1)

    def inference(self, x, n_samples: int = 1, give_mean: bool = False, eps_noise=None,
                  eps_library=None) -> dict:
        """Encode a CSR minibatch.

        ``x`` has ``indptr``, ``indices``, ``values`` and ``library`` (total counts), and
        ``batch`` / ``cat_covs`` / ``cont_covs`` / ``size_factor`` where the model reads them.
        Returns ``q_m``, ``q_v``, ``z`` (``(B, Z)``, or ``(n_samples, B, Z)``; the softmax of
        the normal sample for ``"ln"``, as scvi-tools), ``kl`` (per cell, of ``z``) and
        ``library`` (log library, ``(B,)`` or ``(n_samples, B)``: :meth:`log_library`, or a
        draw of the library encoder); with the library encoder also ``ql_m``, ``ql_v`` and
        ``kl_l``. One sample (training) goes through the fused reparameterisation + KL op;
        ``eps_noise`` / ``eps_library`` fix the noise of ``z`` / of the library.
        ``give_mean`` decodes the means.
        """
        q_m, raw = self._encode(x)
        q_v = posterior_variance(raw)
        if give_mean or n_samples > 1:
            _, kl = F_ops.reparam_kl(q_m, raw, torch.zeros_like(q_m), impl=self.impl)
            if give_mean:
                z = q_m
            elif eps_noise is None:
                z = sample_z(q_m, q_v, n_samples)
            else:
                z = q_m + torch.sqrt(q_v) * eps_noise
        else:
            if eps_noise is None:
                eps_noise = torch.randn_like(q_m)
            z, kl = F_ops.reparam_kl(q_m, raw, eps_noise, impl=self.impl)
        out = {"q_m": q_m, "q_v": q_v, "z": self.z_transformation(z), "kl": kl}
        if self.l_encoder is not None:
            ql_m, ql_v = self.library_posterior(x)
            p_m, p_v = gen_opts.library_prior(self.library_log_means, self.library_log_vars,
                                              getattr(x, "batch", None))
            kl_l = gen_opts.normal_kl(ql_m, ql_v, p_m.to(ql_m.dtype), p_v.to(ql_m.dtype))
            out.update(ql_m=ql_m, ql_v=ql_v, kl_l=kl_l)
        # with size factors the rate reads them even where a library encoder is trained (it
        # then adds only its KL), as scvi-tools
        if self.l_encoder is None or self.use_size_factor_key:
            library = self.log_library(x, q_m.dtype)
            if n_samples > 1 and not give_mean:
                library = library.expand(n_samples, -1)
        elif give_mean:
            library = ql_m
        else:
            shape = ql_m.shape if n_samples == 1 else (n_samples, *ql_m.shape)
            if eps_library is None:
                eps_library = torch.randn(shape, dtype=ql_m.dtype, device=ql_m.device)
            library = ql_m + torch.sqrt(ql_v) * eps_library
        out["library"] = library
        return out

    # ---- generative ------------------------------------------------------------
    def generative(self, z: torch.Tensor, batch: torch.Tensor | None, logits: bool = False,
                   labels: torch.Tensor | None = None, cat_covs: torch.Tensor | None = None,
                   cont_covs: torch.Tensor | None = None) -> dict:
        """Decode ``z`` (``(B, Z)`` or ``(S, B, Z)``, already transformed, as
        :meth:`inference` returns it): the last hidden layer and ``px_r``.

        ``batch`` ``(B,)`` codes, ``labels`` ``(B,)`` (``dispersion="gene-label"``),
        ``cat_covs`` ``(B, n_cats)`` and ``cont_covs`` ``(B, n_cont)`` where the model has them
        (:meth:`covariates_of` a minibatch). ``"hidden"`` is the input of the output layer;
        ``"px_r"`` the log inverse dispersion: ``(G,)`` for ``"gene"``, else ``(..., G)`` per
        cell, gathered by ``batch`` or ``labels`` or decoded (``"gene-cell"``); None for
        ``"gene-label"`` without labels. With ``logits=True`` the dict also holds ``"logits"``,
        the output layer applied to the hidden layer, and for ZINB ``"px_dropout"`` (``B x G``:
        what analysis needs; the loss never forms them itself, see :meth:`loss`).
        """
        lead = z.shape[:-1]
        h = self._hidden(z.reshape(-1, z.shape[-1]), batch, cat_covs, cont_covs)
        out = {"hidden": h.reshape(*lead, -1), "px_r": self._px_r(h, lead, batch, labels)}
        if logits:
            out["logits"] = self.decoder.scale(h).reshape(*lead, -1)
            if self.px_dropout_decoder is not None:
                out["px_dropout"] = self.px_dropout_decoder(h).reshape(*lead, -1)
        return out

    def _px_r(self, h: torch.Tensor, lead, batch, labels) -> torch.Tensor | None:
        """The log inverse dispersion that the decoded cells ``h`` (``(n, H)``) read."""
        if self.dispersion == "gene":
            return self.px_r
        if self.dispersion == "gene-cell":
            return fp32(self.px_r_decoder(h)).reshape(*lead, -1)
        codes = batch if self.dispersion == "gene-batch" else labels
        if codes is None and self.px_r.shape[1] > 1:
            if self.dispersion == "gene-label":
                return None
            raise ValueError("dispersion='gene-batch' needs the cells' batch codes")
        codes = self._codes(codes, h.shape[0], h.device)
        r = gen_opts.gather_dispersion(self.px_r, codes)
        return r.reshape(*lead, -1) if codes is not None else r.reshape(-1)

    # ---- loss --------------------------------------------------------------------
    def loss(self, x, inference_outputs: dict, generative_outputs: dict, kl_weight: float = 1.0):
        """Per-cell reconstruction loss and KL, and the mean to minimise,
        ``mean(rec + kl_weight * kl_z + kl_l)`` (scvi-tools anneals only the KL of ``z``).

        The reconstruction loss is :func:`~scvi_fast.module._generative.reconstruction_loss`
        of the gene likelihood from ``"hidden"``: for NB with a per-gene ``px_r`` the decoder's
        output layer and the likelihood run as one op
        (:func:`scvi_fast.functional.nb_softmax_loglik_linear`), so the ``B x G`` logits are
        never materialised; the other likelihoods form the logits (and the ZINB dropout
        logits) and call their likelihood op. bf16 logits are evaluated in fp32. With
        ``use_size_factor_key`` the scale is scvi-tools' softplus, not a softmax: the
        likelihood is then evaluated unfused on the densified minibatch
        (:func:`~scvi_fast.module._generative.rate_reconstruction_loss`).
        """
        px_r = generative_outputs["px_r"]
        if px_r is None and self.gene_likelihood != "poisson":
            raise ValueError("dispersion='gene-label' needs the cells' labels; pass "
                             "generative(..., labels=...)")
        hidden = generative_outputs["hidden"]
        if self.use_size_factor_key:
            rho = self.px_scale(self.decoder.scale(hidden))
            mu = torch.exp(inference_outputs["library"]).unsqueeze(-1).to(rho.dtype) * rho
            idx, val = csr_masked(x.indptr, x.indices, x.values.to(rho.dtype))
            counts = csr_to_dense(x.indptr, idx, val, self.n_input)
            dropout = (None if self.px_dropout_decoder is None
                       else fp32(self.px_dropout_decoder(hidden)))
            rec = gen_opts.rate_reconstruction_loss(self.gene_likelihood, counts, mu, px_r,
                                                     dropout)
        else:
            rec = gen_opts.reconstruction_loss(
                self.gene_likelihood, self.decoder.scale, hidden, inference_outputs["library"],
                px_r, self.px_dropout_decoder, x, self.impl)
        kl_z = inference_outputs["kl"]
        kl_l = inference_outputs.get("kl_l")
        if kl_l is None:
            return LossOutput(loss=(rec + kl_weight * kl_z).mean(), reconstruction_loss=rec,
                              kl_local=kl_z, kl_z=kl_z)
        return LossOutput(loss=(rec + kl_weight * kl_z + kl_l).mean(), reconstruction_loss=rec,
                          kl_local=kl_z + kl_l, kl_z=kl_z, kl_l=kl_l)

    def forward(self, x, kl_weight: float = 1.0, eps_noise=None):
        """Inference, decoder and loss of a CSR minibatch: ``(inference, generative, loss)``,
        the same as ``loss(x, inf, generative(inf["z"], x.batch, labels=x.labels,
        **covariates_of(x)))``."""
        inf = self.inference(x, eps_noise=eps_noise)
        gen = self.generative(inf["z"], x.batch, labels=getattr(x, "labels", None),
                              **self.covariates_of(x))
        return inf, gen, self.loss(x, inf, gen, kl_weight)

    # ---- derived quantities --------------------------------------------------------
    def px_scale(self, logits: torch.Tensor) -> torch.Tensor:
        """Normalised expression (what scvi-tools calls px_scale): ``rho = softmax(logits)``,
        or ``softplus(logits)`` for a model with ``use_size_factor_key`` (as scvi-tools)."""
        if self.use_size_factor_key:
            return torch.nn.functional.softplus(fp32(logits))
        return torch.softmax(fp32(logits), dim=-1)

    def decode_scale(self, z: torch.Tensor, batch: torch.Tensor | None,
                     cat_covs: torch.Tensor | None = None,
                     cont_covs: torch.Tensor | None = None) -> torch.Tensor:
        """``rho`` (:meth:`px_scale`) of ``decoder(t(z), batch)`` for draws (or the mean)
        ``z`` of the posterior normal, ``(R, Z)``, and codes ``(R,)``; ``t`` is
        :meth:`z_transformation`, covariates as in :meth:`generative`."""
        z = self.z_transformation(z)
        lead = z.shape[:-1]
        h = self._hidden(z.reshape(-1, z.shape[-1]), batch, cat_covs, cont_covs)
        return self.px_scale(self.decoder.scale(h).reshape(*lead, -1))

    def _hidden(self, z2: torch.Tensor, batch: torch.Tensor | None,
                cat_covs: torch.Tensor | None, cont_covs: torch.Tensor | None) -> torch.Tensor:
        """The decoder's last hidden layer of ``(n, Z)`` rows; per-cell inputs of ``B`` cells
        are repeated over the ``n / B`` samples."""
        n = z2.shape[0]
        if batch is not None:
            batch = _tile(batch.reshape(-1), n)
        codes = self.covariate_codes(batch, None if cat_covs is None else _tile(cat_covs, n))
        cont = self._continuous(cont_covs)
        if cont is not None:
            cont = _tile(cont.to(z2.dtype), n)
        return self.decoder.hidden(z2, codes, cont)
