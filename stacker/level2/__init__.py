"""level2"""
