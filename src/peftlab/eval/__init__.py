"""peftlab.eval"""
