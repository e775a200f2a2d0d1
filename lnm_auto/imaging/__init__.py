"""The base imaging layer: the canonical (slice, row, col) frame and node measurements (``geometry``), the
numpy-only axis rules (``axes``), node instances from binary masks (``components``) and the node surface
estimate (``surface``). Used by datasets, conversion, preprocessing, radiomics and inference alike."""
