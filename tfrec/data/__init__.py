"""Data: readers, vocabularies, preprocessing (in memory and Beam), tf.data pipelines."""
