"""Models diffcodec did not train, loaded into diffcodec's own `unet.UNet`.

An external model is read (configs as JSON, weights from safetensors or torch's
``weights_only`` loading: nothing in the files runs), translated into a `ModelConfig`, a
`DiffusionConfig` and a state dict in diffcodec's parameter names, and returned as the same
`checkpoint.LoadedModel` as a diffcodec checkpoint, so the bound, both codecs, the exact
network and the benchmarks run on it through the same functions. Anything the translation
cannot express exactly is a one-line `DiffcodecError`, never an approximation.

- `diffusers`: a diffusers DDPM folder (``UNet2DModel`` + ``DDPMScheduler`` configs).
"""
