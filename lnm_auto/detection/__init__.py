"""The node detector: nnU-Net v2 trained on a dataset's node masks (documentation/detection.md).

``nnunet_dataset``  an lnm raw dataset -> an nnU-Net v2 raw dataset (images copied, node masks as one label)
``train_detector``  ``lnm_train_detector``: nnU-Net's own planning, preprocessing and training, with its folders
                    below the lnm dataset's preprocessed and results folders

Needs the optional ``nnunetv2`` package (``pip install -e ".[detect]"``), imported only inside nnU-Net's own
processes.
"""
