"""Classical radiomics configuration: IBSI-style node features and a scikit-learn classifier stored as JSON."""
from lnm_auto.radiomics.classifier import RadiomicsClassifier, size_rule_scores
from lnm_auto.radiomics.features import FEATURE_COLUMNS, SHAPE_COLUMNS, node_features

__all__ = ["FEATURE_COLUMNS", "SHAPE_COLUMNS", "RadiomicsClassifier", "node_features", "size_rule_scores"]
