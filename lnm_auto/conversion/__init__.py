"""Bring your own data: instance masks from binary masks, and converters to the raw dataset convention.

``components``     connected components -> node instances (used by verification and planning too)
``split_dataset``  ``lnm_plan_and_preprocess --split_components``: a raw dataset's binary masks, in place
``nnunet``         an nnU-Net v2 raw dataset -> an lnm_auto raw dataset
``dicom_series``, ``dicom_seg``, ``rtstruct``  a DICOM series + DICOM-SEG / RTSTRUCT -> NIfTI image + instance mask
``cli``            ``lnm_convert``
"""
