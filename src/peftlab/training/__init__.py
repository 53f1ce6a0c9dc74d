"""peftlab.training"""
