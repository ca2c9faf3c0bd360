"""Seamline workflows: many images, a cluster, progress and the command line."""
