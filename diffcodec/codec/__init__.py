"""The codecs: images to `.dfc` files and back (`api` is the public entry point).

    api.py            encode / decode / read_header: mode dispatch, checks, checksums, devices
    container.py      the .dfc file format: header, image table, CRC (byte table in its docstring)
    fields.py         varints, a defensive reader, presence-masked field tables (compact blocks)
    entropy.py        the only module that imports constriction: ANS stack, range coder
    coding_params.py  network output -> snapped coder parameters; the pixel stage's decoder
    rcc.py            reverse channel coding (Poisson functional representation)
    bitsback/         lossless: chain (one chunk down and up the chain), stream (many tiles
                      on one stack, bootstrap), params (mode-0 block), file (the whole stream)
    progressive/      Algorithms 3/4: syntax (stage symbols, prefixes), codec (the
                      algorithms), params (mode-1 block)
"""

# Lossless coding's default chain length K: on the default model its bound is within 1% of
# the full T = 1000 chain's at a tenth of the network calls (reports/nll.md).
LOSSLESS_STEPS = 100
