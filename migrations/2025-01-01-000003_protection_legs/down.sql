DROP TABLE protection_legs;
