"""Weights in and out of ddx: diffusers / transformers folders (safetensors only) to NNX modules.

* `ddx.models.io.diffusers`: a diffusers ``UNet2DModel`` folder as a `ddx.models.UNet` (and the
  scheduler config as a ddx diffusion section);
* `ddx.models.io.latent`: ``AutoencoderKL``, ``UNet2DConditionModel`` and transformers'
  ``CLIPTextModel`` folders as `ddx.models` modules;
* `ddx.models.io.torch_state`: what both share: reading safetensors and JSON, and mapping
  PyTorch parameter names and layouts onto NNX state.
"""
