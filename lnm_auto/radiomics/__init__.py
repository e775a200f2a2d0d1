"""Classical radiomics configuration: IBSI-style node features (``features``), a scikit-learn classifier
stored as JSON (``classifier``) and the per-dataset feature cache (``dataset_features``). The submodules are
imported where used: the planner needs the feature rules without scikit-learn."""
