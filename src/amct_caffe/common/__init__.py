"""Pieces of AMCT's public API that user code subclasses or passes in (``amct_caffe.common``).

They sit below the workflows: they import nothing of ours but ``errors``, so both the public API and the
workflows can use them.
"""
