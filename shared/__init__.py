"""Code every UNITE service uses: slides, tiles, file formats, the embeddings protocol and model builders.

The slide, tile, protocol and file-format modules import no torch, so a slim image or a plain tool can use
them. Modules under ``shared.models`` need torch and timm.
"""
