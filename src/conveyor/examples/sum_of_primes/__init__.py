"""The asynchronous sum-of-primes service: ``POST /sumPrime`` accepts a job,
``GET /sumPrime/{requestId}`` polls it; three replicas behind nginx share
their jobs through Redis. See README.md."""
