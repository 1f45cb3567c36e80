// SPDX-License-Identifier: MIT
// slither-disable-next-line pragma: OpenZeppelin's files keep their own, wider ranges
pragma solidity ^0.8.30;

/**
 * @dev Loyalty points of pseudonymous subjects. Points cannot be transferred: issuers issue them in
 * lots with an expiry, and partners redeem them with the subject's EIP-712 `Redemption`
 * authorisation, signed by the subject's controller key in {IConsentRegistry}.
 *
 * A subject's lots are kept in a list ordered by expiry. A redemption first sweeps the lots that
 * have expired (they are at the head), then consumes the soonest-expiring ones. Every lot is passed
 * over once in its life, when it is emptied or expires, so the gas of an operation depends on the
 * lots it empties, never on the subject's history.
 *
 * Batch operations apply each item on its own: an item that fails is reported by an event with
 * the reason, and the others still apply. So one customer's insufficient balance never holds up
 * another partner's redemption.
 */
interface ILoyaltyPoints {
    /// @dev One issuance: `amount` points to `subject`, usable until `expiresAt` (exclusive).
    struct Issuance {
        bytes32 subject;
        uint128 amount;
        uint64 expiresAt;
        bytes32 issuanceId;
    }

    /**
     * @dev A `Redemption` message of the subject's controller with its ECDSA signature. `nonce` is a
     * keyed nonce: the upper 192 bits are the partner's address, the lower 64 bits a sequence per
     * (controller, partner), so authorisations at different partners never wait for each other.
     */
    struct SignedRedemption {
        bytes32 subject;
        address partner;
        uint256 amount;
        bytes32 redemptionId;
        uint256 nonce;
        uint256 deadline;
        uint8 v;
        bytes32 r;
        bytes32 s;
    }

    /// @dev A lot as stored: what is left of it, when it expires, and the next lot by expiry.
    struct Lot {
        uint128 remaining;
        uint64 expiresAt;
        uint64 next;
    }

    /// @dev The admin, the operator and the registry must be real accounts.
    error LoyaltyPointsZeroAddress();

    /// @dev An issuance or redemption of zero points, or one larger than a lot can hold.
    error LoyaltyPointsInvalidAmount(uint256 amount);

    /// @dev An issuance whose lot has already expired.
    error LoyaltyPointsInvalidExpiry(uint64 expiresAt);

    /// @dev This issuance id was used before.
    error LoyaltyPointsIssuanceUsed(bytes32 issuanceId);

    /// @dev This redemption id was used before: an authorisation works once.
    error LoyaltyPointsRedemptionUsed(bytes32 redemptionId);

    /// @dev The subject has no controller key, so nothing can be authorised for it.
    error LoyaltyPointsUnboundSubject(bytes32 subject);

    /// @dev The authorisation was signed by `signer`, but the subject's controller is `expected`.
    error LoyaltyPointsInvalidSigner(address signer, address expected);

    /// @dev The authorisation's deadline has passed.
    error LoyaltyPointsExpiredSignature(uint256 deadline);

    /// @dev `partner` does not hold the partner role in the consent registry.
    error LoyaltyPointsUnknownPartner(address partner);

    /// @dev The caller is neither the authorisation's partner nor a relayer.
    error LoyaltyPointsUnauthorizedSubmitter(address caller, address partner);

    /// @dev The subject has `balance` unexpired points, fewer than `amount`.
    error LoyaltyPointsInsufficientBalance(bytes32 subject, uint256 balance, uint256 amount);

    /// @dev `amount` points were issued to `subject`, into lot `lotId` (a lot with the same expiry takes them).
    event PointsIssued(
        bytes32 indexed subject, bytes32 indexed issuanceId, uint64 lotId, uint256 amount, uint64 expiresAt
    );

    /// @dev `partner` redeemed `amount` of `subject`'s points; `balance` is what is left unexpired.
    event PointsRedeemed(
        bytes32 indexed subject,
        address indexed partner,
        bytes32 indexed redemptionId,
        uint256 amount,
        uint256 balance,
        uint256 nonce
    );

    /// @dev Lot `lotId` of `subject` expired with `amount` points unspent; they are gone.
    event PointsExpired(bytes32 indexed subject, uint64 lotId, uint256 amount);

    /// @dev An item of {issueBatch} was not applied; `reason` is the error it would have reverted with.
    event IssuanceRejected(bytes32 indexed subject, bytes32 indexed issuanceId, bytes reason);

    /// @dev An item of {redeemBatch} was not applied; `reason` is the error it would have reverted with.
    event RedemptionRejected(
        bytes32 indexed subject, address indexed partner, bytes32 indexed redemptionId, bytes reason
    );

    /**
     * @dev Issues one lot.
     *
     * Requirements:
     * - the caller has the issuer role;
     * - `amount` is positive and fits 128 bits, `expiresAt` is in the future, `issuanceId` is unused.
     */
    function issue(Issuance calldata issuance) external;

    /**
     * @dev Issues many lots; an item that fails is reported by {IssuanceRejected} and skipped.
     *
     * Requirements: the caller has the issuer role.
     */
    function issueBatch(Issuance[] calldata issuances) external;

    /**
     * @dev Redeems points with the subject's authorisation, soonest-expiring lots first.
     *
     * Requirements:
     * - the caller is the authorisation's partner, or has the relayer role;
     * - the partner holds the partner role in the consent registry;
     * - `deadline` has not passed, the redemption id is unused, `nonce` is the controller's next
     *   nonce for this partner, and the signature is the subject's controller's;
     * - the subject has at least `amount` unexpired points.
     */
    function redeem(SignedRedemption calldata redemption) external;

    /**
     * @dev Redeems many; an item that fails is reported by {RedemptionRejected} and skipped.
     *
     * Requirements: the caller has the relayer role; each item as in {redeem}.
     */
    function redeemBatch(SignedRedemption[] calldata redemptions) external;

    /**
     * @dev Removes up to `maxLots` expired lots of `subject`, emitting {PointsExpired} for each.
     * Anyone may call it; redemptions and issuances do it themselves.
     */
    function sweepExpired(bytes32 subject, uint256 maxLots) external;

    /// @dev Unexpired points of `subject`.
    function balanceOf(bytes32 subject) external view returns (uint256);

    /// @dev The subject's live lots (expired ones not yet swept included), soonest expiry first.
    function lotsOf(bytes32 subject) external view returns (uint64[] memory ids, Lot[] memory lots);

    /// @dev Totals over all subjects: issued, redeemed, and expired (swept) points.
    function totals() external view returns (uint256 issued, uint256 redeemed, uint256 expired);

    /// @dev Whether `redemptionId` has been used.
    function redemptionUsed(bytes32 redemptionId) external view returns (bool);
}
